"""The one place that maps HF weight names to ONNX graph weights (f32 numpy arrays).

The decoder's names are found as the JAX loader finds them (nanovllm_jax.models.gemma3): under "model." for
*ForCausalLM, "model.language_model." / "language_model.model." for Gemma3ForConditionalGeneration saved by
transformers 5.x / 4.x, with the untied head at "lm_head.weight" or "language_model.lm_head.weight".
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from backends.onnx.model_spec import ModelSpec
from nanovllm_jax import loader
from nanovllm_jax.models.gemma3 import DECODER_PREFIXES, LM_HEADS
from nanovllm_jax.models.llama import output_head


class SafetensorsDir(loader.SafetensorsDir):
    """The loader's safetensors reader, widening every tensor to contiguous f32 for the graph."""

    def get(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(super().get(name), dtype=np.float32)

    @cached_property
    def prefix(self) -> str:
        """Where the decoder's tensors live: the first of DECODER_PREFIXES that holds an embedding table."""
        found = next((p for p in DECODER_PREFIXES if p + "embed_tokens.weight" in self), None)
        if found is None:
            raise ValueError("no embedding table in the checkpoint (looked for "
                             f"{', '.join(repr(p + 'embed_tokens.weight') for p in DECODER_PREFIXES)})")
        return found


def layer_weights(w: SafetensorsDir, i: int, spec: ModelSpec) -> dict[str, np.ndarray | None]:
    """Graph weights of decoder layer i (HF Llama/Qwen2/Qwen3/Gemma 3 names); optional ones are None.

    Which optional tensors a layer has (biases, q/k norms, Gemma's sandwich norms) follows the config, as in
    the JAX backend and transformers: a checkpoint's other tensors are ignored, a missing one is an error
    (the config parser shared with the JAX backend refuses mlp_bias=true).
    q/k/v and gate/up are fused so that each layer runs two input matmuls instead of five.
    Linear weights keep HF's [out, in] layout; the graph multiplies with transB.
    """
    p = f"{w.prefix}layers.{i}."
    attn, mlp = p + "self_attn.", p + "mlp."
    qkv = [w.get(attn + f"{n}_proj.weight") for n in "qkv"]
    # Gemma 3 norms both sides of attention and MLP ("sandwich"); Llama/Qwen only their inputs
    sandwich = spec.architecture == "gemma3_text"
    return {
        "attn_in_norm": w.get(p + "input_layernorm.weight"),
        "attn_out_norm": w.get(p + "post_attention_layernorm.weight") if sandwich else None,
        "mlp_in_norm": w.get(p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")),
        "mlp_out_norm": w.get(p + "post_feedforward_layernorm.weight") if sandwich else None,
        "qkv": np.concatenate(qkv),
        # Qwen2 has q/k/v biases, Llama / Qwen3 / Gemma 3 may (attention_bias)
        "qkv_bias": np.concatenate([w.get(attn + f"{n}_proj.bias") for n in "qkv"]) if spec.qkv_bias else None,
        "o": w.get(attn + "o_proj.weight"),
        "o_bias": w.get(attn + "o_proj.bias") if spec.o_bias else None,
        "q_norm": w.get(attn + "q_norm.weight") if spec.qk_norm else None,  # Qwen3, Gemma 3
        "k_norm": w.get(attn + "k_norm.weight") if spec.qk_norm else None,
        "gate_up": np.concatenate([w.get(mlp + "gate_proj.weight"), w.get(mlp + "up_proj.weight")]),
        "down": w.get(mlp + "down_proj.weight"),
    }


def embedding(w: SafetensorsDir) -> np.ndarray:
    return w.get(w.prefix + "embed_tokens.weight")


def final_norm(w: SafetensorsDir) -> np.ndarray:
    return w.get(w.prefix + "norm.weight")


def lm_head(w: SafetensorsDir, spec: ModelSpec) -> np.ndarray | None:
    """The untied output projection [vocab, hidden], or None when the head reuses the embedding: picked as
    the JAX loader picks it (llama.output_head)."""
    return output_head(spec, lambda name, shape: w.get(name), w.__contains__, lambda: embedding(w), LM_HEADS)

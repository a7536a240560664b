"""The shape of a decoder-only model, read from an HF config.json (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nanovllm_jax import loader

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # HF model_type
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: dict  # rope_theta, rope_type and the type's parameters (of the full-attention layers)
    activation: str = "silu"  # MLP gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    attn_scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)
    embed_scale: float = 1.0  # Gemma scales embeddings by sqrt(hidden)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "full" or "sliding" per layer; empty: all full
    rope_local: dict | None = None  # RoPE of the sliding layers
    # the optional tensors the config says the layers have (as the JAX backend reads it); others in the
    # checkpoint are ignored, as transformers ignores them
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding" in self.layer_types

    @property
    def has_local_mask(self) -> bool:
        """Whether the sliding layers attend through attn_bias_local. With sliding_window null they keep
        their local RoPE but see the whole context (attn_bias), as on the JAX backend."""
        return self.has_sliding_layers and self.sliding_window is not None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> dict:
        return asdict(self)


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Read through the JAX backend's own config parsers: the same defaults, field spellings and checks."""
    from nanovllm_jax.models import llama

    hf = loader.read_hf_config(model_dir)  # also refuses quantized checkpoints
    text = hf.get("text_config", hf)
    if hf.get("model_type") == "gemma3" or text.get("model_type") == "gemma3_text":
        return _gemma3_spec(hf)
    if text.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the ONNX exporter supports {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"got model_type={text.get('model_type')!r}")
    cfg = llama.parse_config(text)
    rope = _rope_params(dict(cfg.rope_scaling or ()), cfg.rope_theta)
    window = next((w for w in cfg.layer_windows if w is not None), None)  # the family has one window size
    return ModelSpec(architecture=text["model_type"], **_shape(cfg), rope=rope, sliding_window=window,
                     layer_types=tuple("full" if w is None else "sliding" for w in cfg.layer_windows) if window else (),
                     rope_local=rope if window else None,  # the same RoPE on both kinds of layers
                     qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm)


def _gemma3_spec(hf: dict) -> ModelSpec:
    """Gemma3ForCausalLM or the text decoder of Gemma3ForConditionalGeneration, read by the JAX backend's own
    parse_config: the same defaults (transformers' Gemma3TextConfig, tied head), text_config, layer types and
    RoPE forms (transformers 4.x and 5.x)."""
    from nanovllm_jax.models import gemma3

    cfg = gemma3.parse_config(hf)
    # parse_config drops the final cap where transformers ignores it (the multimodal model never applies it);
    # attn_logit_softcapping is ignored, as transformers' Gemma 3 and the JAX backend do
    if cfg.final_logit_softcapping is not None:
        raise ValueError("final_logit_softcapping is not supported by the ONNX exporter")
    if not cfg.gelu_tanh:
        raise ValueError("the ONNX exporter supports Gemma's tanh-approximated GELU only (hidden_activation="
                         "'gelu_pytorch_tanh'), not the exact 'gelu'")
    return ModelSpec(
        architecture="gemma3_text",
        **_shape(cfg),
        rope=_rope_params(dict(cfg.rope_global)),
        activation="gelu_tanh",
        attn_scale=cfg.query_pre_attn_scalar ** -0.5,
        embed_scale=float(np.float32(cfg.hidden_size ** 0.5)),
        norm_offset=1.0,
        sliding_window=cfg.sliding_window,
        layer_types=tuple("sliding" if s else "full" for s in cfg.sliding_layers),
        rope_local=_rope_params(dict(cfg.rope_local)),
        qkv_bias=cfg.attention_bias,
        o_bias=cfg.attention_bias,
        qk_norm=True,
    )


def _shape(cfg) -> dict:
    """The fields a JAX model config (Llama or Gemma 3) and the spec share."""
    names = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
             "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    return {name: getattr(cfg, name) for name in names}


def _rope_params(params: dict, theta: float | None = None) -> dict:
    """rope_theta, rope_type and the type's parameters, as the graph reads them."""
    params = dict(params)
    params["rope_type"] = params.pop("rope_type", params.pop("type", "default"))
    if theta is not None:
        params["rope_theta"] = theta
    return params

"""Tiny random-weight HF checkpoints (Qwen3, Qwen2, Llama, Gemma 3) written with numpy, for the ONNX tests.

Weights are drawn with std 0.2 (norm weights around 1) so that greedy tokens are far from ties, and
every optional feature the exporter maps is present somewhere: q/k norms (Qwen3), qkv biases (Qwen2),
llama3 RoPE scaling and an untied head (Llama), GQA everywhere, head_dim != hidden / heads (Qwen3),
and Gemma 3's sandwich norms, GeGLU, scaled embeddings and sliding-window layers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from backends.mock import SIMPLE_BPE_PATH
from nanovllm_jax.random_models import tensor_shapes

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1024, max_position_embeddings=512,
             rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.2, bos_token_id=1, eos_token_id=0)

TINY_CONFIGS: dict[str, dict] = {
    "qwen3": dict(_BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2": dict(_BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_attention_heads=4,
                  num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=True),
    "llama": dict(_BASE, architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
    # sliding window 8 on two of three layers, so that every prompt outgrows it
    "gemma3": dict(_BASE, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
                   hidden_activation="gelu_pytorch_tanh", sliding_window=8, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1000000.0),
                                    "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
                   final_logit_softcapping=None, attn_logit_softcapping=None),
}


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and the SimpleBPE tokenizer.json into out_dir; `overrides`
    replace config fields (the weights depend only on the shapes)."""
    config = TINY_CONFIGS[arch] | overrides
    rng = np.random.default_rng(seed)
    std = config["initializer_range"]
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith("norm.weight"):  # Gemma multiplies by (1 + w)
            center = 0.0 if config["model_type"] == "gemma3_text" else 1.0
            tensors[name] = (center + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(SIMPLE_BPE_PATH, out_dir / "tokenizer.json")
    return out_dir


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers (torch CPU, f32) greedy continuation of each prompt: the reference tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(prompt):].tolist())
    return outs

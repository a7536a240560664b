"""Architecture-shaped random-weight checkpoints, built locally (no hub): HF config + safetensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from nanovllm_jax import disk_cache


# Shapes of public checkpoints; vocab and context as published.
RANDOM_CONFIGS: dict[str, dict] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_act="silu", attention_bias=False,
    ),
    "qwen2-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_act="silu",
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        hidden_act="silu", rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of a Llama / Qwen2 / Qwen3 / Gemma 3 text checkpoint with config `c`."""
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if c["model_type"] in ("qwen3", "gemma3_text"):
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if c["model_type"] == "gemma3_text":
            shapes |= {p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
        if c["model_type"] == "qwen2":
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def random_weight(rng: np.random.Generator, name: str, shape: tuple, std: float) -> np.ndarray:
    """Norm weights 1, others normal with `std`: activations keep a sane scale through every layer."""
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * std


def build_random_model(name: str, out_dir: Path, seed: int = 0, std: float = 0.02) -> Path:
    """Write `name`'s config, random f32 weights and the SimpleBPE tokenizer into out_dir (once)."""
    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random-weights config {name!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    out_dir = Path(out_dir)
    if disk_cache.lookup(out_dir, _is_built):
        return out_dir
    from backends.mock import SIMPLE_BPE_PATH

    disk_cache.writable_dir(out_dir.parent, "XDG_CACHE_HOME")  # before the work, not after it
    config = RANDOM_CONFIGS[name]
    rng = np.random.default_rng(seed)
    tensors = {tensor: random_weight(rng, tensor, shape, std) for tensor, shape in tensor_shapes(config).items()}
    tmp = disk_cache.scratch_path(out_dir.parent, out_dir.name)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32", "eos_token_id": 0}, indent=1))
        shutil.copy(SIMPLE_BPE_PATH, tmp / "tokenizer.json")
        disk_cache.publish(tmp, out_dir, _is_built)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_built(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))

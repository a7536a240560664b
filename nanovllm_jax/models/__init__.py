"""Architecture registry: HF `architectures[0]` -> the model module that implements it.

A model module provides parse_config(hf_dict) -> static config (frozen dataclass, with
max_position_embeddings, vocab_size, num_layers, num_kv_heads, head_dim), load_params(cfg, get, has)
-> numpy params pytree, and forward(params, k_cache, v_cache, ForwardInputs, cfg) ->
(logits, k_cache, v_cache).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import jax

from nanovllm_jax.layers.attention import AttentionMetadata


class ForwardInputs(NamedTuple):
    """What a model's forward reads besides params and cache (built on device from the packed step)."""

    input_ids: jax.Array  # i32[T]
    slot_mapping: jax.Array  # i32[T]; out of range for padding tokens (the scatter drops them)
    logits_indices: jax.Array  # i32[S]; the token whose logits each sequence row needs
    attn: AttentionMetadata


# architecture name -> module path; other families register here (e.g. Gemma 3).
REGISTRY: dict[str, str] = {
    "Gemma3ForCausalLM": "nanovllm_jax.models.gemma3",
    "Gemma3ForConditionalGeneration": "nanovllm_jax.models.gemma3",  # its text decoder
    "LlamaForCausalLM": "nanovllm_jax.models.llama",
    "MistralForCausalLM": "nanovllm_jax.models.llama",
    "Qwen2ForCausalLM": "nanovllm_jax.models.llama",
    "Qwen3ForCausalLM": "nanovllm_jax.models.llama",
}


def model_module(hf_config: dict) -> ModuleType:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in REGISTRY:
            return importlib.import_module(REGISTRY[arch])
    raise ValueError(
        f"unknown architecture {archs or hf_config.get('model_type')!r} in config.json; "
        f"supported: {', '.join(sorted(REGISTRY))}"
    )

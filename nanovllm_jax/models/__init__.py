"""Architecture registry: HF `architectures[0]` -> the model module that implements it.

A model module provides parse_config(hf_dict) -> static config (frozen dataclass, with
max_position_embeddings, vocab_size, num_layers, num_kv_heads, head_dim), load_params(cfg, get, has)
-> numpy params pytree, and forward(params, k_cache, v_cache, ForwardInputs, cfg) ->
(logits, k_cache, v_cache).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from types import ModuleType
from typing import Callable, NamedTuple, TypeVar

import jax

from nanovllm_jax.config import is_count
from nanovllm_jax.layers.attention import AttentionMetadata


class ForwardInputs(NamedTuple):
    """What a model's forward reads besides params and cache (built on device from the packed step)."""

    input_ids: jax.Array  # i32[T]
    slot_mapping: jax.Array  # i32[T]; out of range for padding tokens (the scatter drops them)
    logits_indices: jax.Array  # i32[S]; the token whose logits each sequence row needs
    attn: AttentionMetadata


Config = TypeVar("Config")


# the shape fields every model config has (HF's names where they differ): positive integers
SHAPE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "max_position_embeddings": "max_position_embeddings"}


def _as_count(value):
    """A count as config.json may write it: 2048.0 is 2048 (as some exporters write counts); else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def config_parser(parse: Callable[[dict], Config]) -> Callable[[dict], Config]:
    """A parse_config whose missing or mistyped config.json field is a ValueError that names it."""
    @functools.wraps(parse)
    def checked(hf: dict) -> Config:
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold an object, got {type(hf).__name__}")
        try:
            cfg = parse(hf)
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, AttributeError, ZeroDivisionError) as e:
            raise ValueError(f"config.json has a field of the wrong type or value: {e}") from None
        cfg = dataclasses.replace(cfg, **{name: _as_count(getattr(cfg, name)) for name in SHAPE_FIELDS})
        for name, hf_name in SHAPE_FIELDS.items():
            value = getattr(cfg, name)
            if not is_count(value):
                raise ValueError(f"config.json field {hf_name} must be a positive integer, got {value!r}")
        return cfg
    return checked


def sliding_window(hf: dict, default: int | None) -> int | None:
    """The config's sliding_window: a positive integer, or null for none (transformers refuses other values)."""
    window = hf.get("sliding_window", default)
    if window is not None and not is_count(window):
        raise ValueError(f"config field sliding_window must be a positive integer or null, got {window!r}")
    return window


def sliding_layers(hf: dict, is_sliding: Callable[[int], bool]) -> tuple[bool, ...]:
    """Per layer, whether it attends within a sliding window: the config's layer_types, else the family's
    rule `is_sliding(layer)` (as transformers 5 fills layer_types in). Empty where num_hidden_layers is
    not a count: config_parser refuses that field itself."""
    n = _as_count(hf["num_hidden_layers"])
    if not is_count(n):
        return ()
    types = hf.get("layer_types")
    if types is None:
        types = ["sliding_attention" if is_sliding(i) else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"config field layer_types={types!r} does not list {n} sliding/full_attention layers")
    return tuple(t == "sliding_attention" for t in types)


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

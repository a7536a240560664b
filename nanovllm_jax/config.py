"""Engine configuration: every engine kwarg of `LLM(...)`, validated in one place."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np


@dataclass
class EngineConfig:
    model: str | None = None
    backend: str = "jax"
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # None: 512, or max_model_len without chunked prefill
    max_model_len: int | None = None  # None: the model's limit (capped at 4096), or 2048 for the mock
    kvcache_block_size: int = 16
    num_kvcache_blocks: int | None = None  # None: as many as the runner's memory budget holds
    kv_cache_memory_bytes: int | None = None  # KV cache byte budget; overrides gpu_memory_utilization
    # fraction of what JAX's allocator may use (XLA_PYTHON_CLIENT_MEM_FRACTION of the card, 0.75 by
    # default) for weights + KV cache + activations
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str | None = None  # None or "auto": float32 on CPU, bfloat16 on GPU/TPU
    seed: int = 0
    compilation_cache_dir: str | None = None  # None: xla/ under disk_cache.cache_home()

    BACKENDS = ("jax", "onnx", "mock")

    @classmethod
    def from_kwargs(cls, model: str | None, backend: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        config = cls(model=model, backend=backend, **kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if self.model is not None:
            if not isinstance(self.model, (str, os.PathLike)):
                raise ValueError(f"model must be None, a model dir or a .gguf path, got {self.model!r}")
            self.model = os.fspath(self.model)
        if self.backend not in self.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(self.BACKENDS)}")
        _require_int("max_num_seqs", self.max_num_seqs, 1)
        if self.max_num_batched_tokens is not None:
            _require_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_model_len is not None:
            _require_int("max_model_len", self.max_model_len, 1)
        bs = self.kvcache_block_size
        if not isinstance(bs, int) or bs < 8 or bs & (bs - 1):
            raise ValueError(f"kvcache_block_size must be a power of two >= 8, got {bs!r}")
        if self.num_kvcache_blocks is not None:
            _require_int("num_kvcache_blocks", self.num_kvcache_blocks, 1)
        if self.kv_cache_memory_bytes is not None:
            _require_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1)
        gpu = self.gpu_memory_utilization
        if isinstance(gpu, bool) or not isinstance(gpu, (int, float)) or not 0.0 < gpu <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {gpu!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.compilation_cache_dir is not None:
            if not isinstance(self.compilation_cache_dir, (str, os.PathLike)):
                raise ValueError(f"compilation_cache_dir must be None or a path, got {self.compilation_cache_dir!r}")
            self.compilation_cache_dir = os.fspath(self.compilation_cache_dir)
        if self.dtype is not None and not isinstance(self.dtype, str):  # np.float16, jnp.bfloat16, np.dtype(...)
            self.dtype = _dtype_name(self.dtype)
        if self.dtype == "auto":  # vLLM's spelling of its default, here the platform's default
            self.dtype = None
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        _require_int("seed", self.seed, 0)

    def finalize(self, model_max_len: int) -> None:
        """Settle the fields that depend on the model, once the runner knows it (again: the same result)."""
        if self.max_model_len is None:
            self.max_model_len = min(model_max_len, 4096)
        elif self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's limit of {model_max_len}")
        if self.max_num_batched_tokens is None:  # as in vLLM, a step without chunking takes any whole prompt
            self.max_num_batched_tokens = 512 if self.enable_chunked_prefill else max(512, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}) so that every prompt fits in one step"
            )
        # no step holds more: a larger budget would only compile programs for steps that never come
        self.max_num_batched_tokens = min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)

    @property
    def max_blocks_per_seq(self) -> int:
        assert self.max_model_len is not None
        return -(-self.max_model_len // self.kvcache_block_size)


def read_json_object(path: Path) -> dict:
    """A model dir's JSON file (config.json, tokenizer_config.json ...), or a ValueError naming it."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def text_config_of(config: dict, path: Path) -> dict:
    """config.json's `text_config` (a multimodal checkpoint's decoder), {} where it has none."""
    text = config.get("text_config") or {}
    if not isinstance(text, dict):
        raise ValueError(f"text_config in {path} must be an object, got {type(text).__name__}")
    return text


def is_count(value, minimum: int = 1) -> bool:
    """An int (not a bool) of at least `minimum`: what every size, count and id field must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _require_int(name: str, value, minimum: int) -> None:
    if not is_count(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _dtype_name(dtype: object) -> object:
    """numpy's name for a dtype object ("float16"), or the object itself when numpy knows none."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return dtype

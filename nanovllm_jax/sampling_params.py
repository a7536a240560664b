from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numpy as np

from nanovllm_jax.config import is_count

SAMPLING_EPS = 1e-5  # as in vLLM: a temperature below this samples greedily
FLOAT32_MAX = 3.4028234663852886e38  # temperature and repetition_penalty reach the samplers as float32


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 64  # None: as many as max_model_len leaves
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy scalars (np.int64(32), np.float32(0.7)) as Python numbers
            setattr(self, f.name, _plain_number(getattr(self, f.name)))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple, set, frozenset, np.ndarray))
                                      or isinstance(value, np.ndarray) and value.ndim != 1):
                raise ValueError(f"{name} must be None or a list, got {value!r}")
            setattr(self, name, [_plain_number(v) for v in (value if value is not None else [])])
        _check_float("temperature", self.temperature, 0.0, FLOAT32_MAX, "[0, 3.4e38] (finite)")
        _check_int("top_k", self.top_k, -1, "-1 or 0 (off) or >= 1")
        if self.top_k == 0:  # vLLM takes 0 as off, as HF generation configs write it
            self.top_k = -1
        _check_float("top_p", self.top_p, 0.0, 1.0, "(0, 1]")
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0.0")
        _check_float("min_p", self.min_p, 0.0, 1.0, "[0, 1]")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "None or an integer in [0, 2**32)")
            if self.seed >= 2**32:
                raise ValueError(f"seed must be None or an integer in [0, 2**32), got {self.seed}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, "None or >= 1")
        _check_int("min_tokens", self.min_tokens, 0, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, "None or an integer in [0, 20]")
            if self.logprobs > 20:
                raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs}")
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, FLOAT32_MAX, "(0, 3.4e38] (finite)")
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be in (0, 3.4e38] (finite), got 0.0")
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0, "[-2, 2]")
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "[-2, 2]")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that logits / temperature would overflow: every backend
        gets temperature 0 for these (the engine builds the batch from this)."""
        return self.temperature < SAMPLING_EPS


def _plain_number(value):
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and type(value) not in (float, bool):  # np.float32, np.float64 (a float subclass)
        try:
            return float(value)
        except OverflowError:  # a Fraction past float's range: left for the range check to name
            return value
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_float(name: str, value, low: float, high: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails the range
        raise ValueError(f"{name} must be in {allowed}, got {_shown(value)}")


def _check_int(name: str, value, low: int, allowed: str) -> None:
    if not is_count(value, low):
        raise ValueError(f"{name} must be {allowed}, got {_shown(value)}")

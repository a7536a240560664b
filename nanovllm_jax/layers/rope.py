"""Rotary position embeddings (HF "rotate_half" layout) and their frequency tables.

Frequencies are computed once on the host in float64 and stored as an f32 array in the params,
so a model may carry several tables (e.g. Gemma 3's local and global bases).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


_REQUIRED_KEYS = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """inv_freq[head_dim // 2] for the default, linear or llama3 rope types."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if (scaling or {}).get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor) are unsupported")
    missing = [key for key in _REQUIRED_KEYS.get(rope_type, ()) if key not in scaling]
    if missing:
        raise ValueError(f"rope scaling of type {rope_type!r} lacks {', '.join(missing)}")
    if rope_type == "default":
        return inv_freq.astype(np.float32)
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, and the band between interpolated.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_angles(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., T, head_dim / 2] of positions[T] times inv_freq[..., head_dim / 2], in f32:
    computed once per step for all layers (inside a GPU layer loop they would cost a kernel per layer)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[..., None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x[T, heads, head_dim] by the angles cos/sin[T, head_dim / 2]; the math runs in f32."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

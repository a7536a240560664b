"""The online-softmax state (running max m, sum l, weighted values acc) of attention rows: folded one
block of keys at a time, and merged across disjoint key sets. Shared by the pure-JAX attention and
the Pallas context kernel (plain jnp, so it traces inside a kernel too)."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

MASKED = -1e30  # a masked score: finite, so a fully masked block never turns the running max into NaN

State = tuple[jax.Array, jax.Array, jax.Array]


def fold(state: State, s: jax.Array, weighted_values: Callable[[jax.Array], jax.Array]) -> State:
    """Fold one block of masked scores s [..., C] into the state; weighted_values(p [..., C]) -> [..., D]
    is p times the block's values."""
    m, l, acc = state
    m_next = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_next[..., None])
    alpha = jnp.exp(m - m_next)
    return m_next, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + weighted_values(p)


def merge(m: jax.Array, l: jax.Array, acc: jax.Array) -> State:
    """States of the same rows over disjoint key sets, stacked on axis 0 -> the state over their union."""
    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all)
    return m_all, (l * w).sum(axis=0), (acc * w[..., None]).sum(axis=0)

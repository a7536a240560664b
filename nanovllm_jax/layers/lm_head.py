"""Output logits against a vocab-major table [V, H] (the embedding, or an untied head as HF stores it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_head(h: jax.Array, table: jax.Array) -> jax.Array:
    """f32 logits [S, V] for hidden rows h [S, H].

    Computed as table @ h.T, then transposed: with the large vocab as the GEMM's M dimension XLA:CPU
    runs this 1.5x faster than h @ table.T for 8-32 rows (the head is most of a small model's
    decode step). The barrier stops XLA from folding the transpose back into the dot's layout."""
    logits = jnp.einsum("vh,sh->vs", table, h.astype(table.dtype), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(logits).T

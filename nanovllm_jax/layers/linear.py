"""Dense layers against weights stored [out, in], as HF stores them (projections, and the vocab-major
embedding / LM head table)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Up to this many rows XLA:CPU runs w @ x.T 1.3-2x faster than x @ w.T (the large `out` as the GEMM's
# M dimension); from about here on both forms cost the same.
WEIGHT_MAJOR_MAX_ROWS = 128


def linear(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [T, in] -> [T, out] for w [out, in]; out_dtype (e.g. f32 logits) is the accumulation dtype."""
    out_dtype = out_dtype or x.dtype
    x = x.astype(w.dtype)
    if x.shape[0] > WEIGHT_MAJOR_MAX_ROWS:
        return jnp.einsum("ti,oi->to", x, w, preferred_element_type=out_dtype)
    y = jnp.einsum("oi,ti->ot", w, x, preferred_element_type=out_dtype)
    # The barrier stops XLA from folding the transpose back into the dot's layout.
    return jax.lax.optimization_barrier(y).T

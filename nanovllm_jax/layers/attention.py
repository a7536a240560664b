"""Paged attention in pure JAX over one flat token batch (prefill, chunked prefill and decode alike).

Every token t of sequence s attends to the positions p <= pos[t] of s. These split into two sets:
  * this step's own new tokens (p >= cached_len[s]): a dense [T, T] score block with a
    same-sequence causal mask, using the K/V just computed (no cache read);
  * the cached context (p < cached_len[s]): read from the paged cache through the block table,
    a chunk of pages at a time with an online softmax. Tokens go in blocks of TOKEN_BLOCK, each
    visiting only as many chunks as its own longest context needs, so a decode step costs
    O(sum of contexts) and fresh prefill tokens skip the cache, even in a step that mixes both.
Decode is the special case T == S: every token is its own sequence and reads its pages once.
The cache is the stacked [layers, kv_heads, slots, head_dim] array (slot = block * block_size +
offset): kv-head-major, so a gathered chunk already has the [kv_head, token, key, dim] layout the
batched dots want and XLA adds no transposed copy of it (2x faster on CPU than slot-major).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a fully masked chunk never turns the running max into NaN
TOKEN_BLOCK = 16  # tokens that walk their cached contexts together


@partial(jax.tree_util.register_dataclass,
         data_fields=["positions", "seq_ids", "cached_lens", "block_tables"],
         meta_fields=["block_size", "pages_per_chunk"])
@dataclass(frozen=True)
class AttentionMetadata:
    """Per-token attention inputs; a pytree whose two sizes are static (part of the compiled shape)."""

    positions: jax.Array  # i32[T]
    seq_ids: jax.Array  # i32[T]; -1 for padding tokens (they attend only among themselves)
    cached_lens: jax.Array  # i32[T]; positions of the token's sequence already in the cache before this step
    block_tables: jax.Array  # i32[T, W]; the token's sequence's block table, W a multiple of pages_per_chunk
    block_size: int  # static
    pages_per_chunk: int  # static


def gather_blocks(cache: jax.Array, layer: jax.Array | int, block_ids: jax.Array, block_size: int) -> jax.Array:
    """cache[L, KV, slots, D] at (layer, the slots of block_ids[T, P]) -> [KV, T, P, bs, D], read straight
    from the stacked cache (no per-layer slice copy, no reshaped view whose layout XLA might change
    with a whole-cache copy) and laid out for the batched dots."""
    layer_ids = jnp.broadcast_to(jnp.asarray(layer, jnp.int32), block_ids.shape)
    indices = jnp.stack([layer_ids, block_ids * block_size], axis=-1)  # [T, P, 2]
    _, kv, _, d = cache.shape
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(0, 3, 4), collapsed_slice_dims=(0,), start_index_map=(0, 2))
    return jax.lax.gather(cache, indices, dims, slice_sizes=(1, kv, block_size, d), mode="clip")


def paged_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    meta: AttentionMetadata,
    *,
    scale: float,
    layer: jax.Array | int = 0,
    sliding_window: int | jax.Array | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """q[T, H, D] over k/v_new[T, KV, D] and the cached context in k/v_cache[L, KV, slots, D] at `layer`.

    GQA: query head h reads kv head h // (H // KV). `sliding_window` (None: full) keeps keys with
    pos[t] - p < window; `softcap` applies cap * tanh(score / cap). Returns [T, H, D] in q's dtype.
    """
    t, h, d = q.shape
    kv = k_new.shape[1]
    qg = q.reshape(t, kv, h // kv, d).transpose(1, 0, 2, 3)  # [KV, T, G, D]
    pos = meta.positions

    def scores(queries: jax.Array, keys: jax.Array, equation: str) -> jax.Array:
        s = jnp.einsum(equation, queries, keys, preferred_element_type=jnp.float32) * scale
        return s if softcap is None else softcap * jnp.tanh(s / softcap)

    def in_window(key_pos: jax.Array) -> jax.Array:  # key_pos broadcastable to [T, C]
        if sliding_window is None:
            return jnp.ones((), bool)
        return (pos[:, None] - key_pos) < sliding_window

    # This step's tokens: same sequence, causal.
    s_new = scores(qg, k_new, "ktgd,ckd->ktgc")  # [KV, T, G, T]
    mask = (meta.seq_ids[:, None] == meta.seq_ids[None, :]) & (pos[None, :] <= pos[:, None])
    mask &= in_window(pos[None, :])
    s_new = jnp.where(mask[None, :, None, :], s_new, MASKED)
    m = s_new.max(axis=-1)  # finite: every token sees itself
    p = jnp.exp(s_new - m[..., None])
    l = p.sum(axis=-1)
    acc = jnp.einsum("ktgc,ckd->ktgd", p, v_new.astype(jnp.float32))

    # The cached context, per block of tokens, each block a chunk of pages at a time for as many
    # chunks as its own longest context needs: fresh prefill tokens cost nothing here, and a
    # prefill step that also carries decodes does not make all its tokens walk the decodes' contexts.
    bs, ppc = meta.block_size, meta.pages_per_chunk
    chunk = bs * ppc
    tb = token_block(t)

    def visit_block(b, state):
        start = b * tb
        q_b = jax.lax.dynamic_slice_in_dim(qg, start, tb, axis=1)  # [KV, tb, G, D]
        pos_b, cached_b = (jax.lax.dynamic_slice_in_dim(x, start, tb) for x in (pos, meta.cached_lens))
        tables_b = jax.lax.dynamic_slice_in_dim(meta.block_tables, start, tb, axis=0)

        def visit(j, block_state):
            m, l, acc = block_state
            blocks = jax.lax.dynamic_slice_in_dim(tables_b, j * ppc, ppc, axis=1)  # [tb, P]
            keys = gather_blocks(k_cache, layer, blocks, bs).reshape(kv, tb, chunk, d)
            vals = gather_blocks(v_cache, layer, blocks, bs).reshape(kv, tb, chunk, d)
            key_pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)
            ok = key_pos[None, :] < cached_b[:, None]
            if sliding_window is not None:
                ok &= (pos_b[:, None] - key_pos[None, :]) < sliding_window
            s = jnp.where(ok[None, :, None, :], scores(q_b, keys, "ktgd,ktcd->ktgc"), MASKED)
            m_next = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_next[..., None])
            alpha = jnp.exp(m - m_next)
            l = l * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum("ktgc,ktcd->ktgd", p, vals.astype(jnp.float32))
            return m_next, l, acc

        block_state = tuple(jax.lax.dynamic_slice_in_dim(x, start, tb, axis=1) for x in state)
        block_state = jax.lax.fori_loop(0, (cached_b.max() + chunk - 1) // chunk, visit, block_state)
        return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, start, axis=1) for x, y in zip(state, block_state))

    m, l, acc = jax.lax.fori_loop(0, t // tb, visit_block, (m, l, acc))
    out = acc / l[..., None]  # [KV, T, G, D]
    return out.transpose(1, 0, 2, 3).reshape(t, h, d).astype(q.dtype)


def token_block(tokens: int) -> int:
    """Tokens per block of the context loop: the largest power of two up to TOKEN_BLOCK dividing `tokens`."""
    return math.gcd(tokens, TOKEN_BLOCK)

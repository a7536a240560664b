"""Paged attention in pure JAX over one flat token batch (prefill, chunked prefill and decode alike).

Every token t of sequence s attends to the positions p <= pos[t] of s. These split into two sets:
  * this step's own new tokens (p >= cached_len[s]): scored with the K/V just computed (no cache
    read), per block of queries against the key blocks their sequences span (same-sequence causal
    mask), so a step of many short prompts does not pay for the full [T, T];
  * the cached context (p < cached_len[s]): read from the paged cache through the block table,
    a chunk of pages at a time with an online softmax. Tokens go in blocks of `token_block`, each
    visiting only as many chunks as its own longest context needs, so a decode step costs
    O(sum of contexts) and fresh prefill tokens skip the cache, even in a step that mixes both.
On GPU one Pallas kernel (attention_kernel.py) does both at once from the cache, where the model
has already written this step's K/V: one program per tile of a sequence's new tokens and kv head
reads its own pages up to its last token, with no gathered copy and no loop outside the kernel.
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

from nanovllm_jax.layers.attention_kernel import paged_attention_kernel
from nanovllm_jax.layers.online_softmax import MASKED, fold

NO_WINDOW = 1 << 30  # a window longer than any context: full attention as per-layer data


@partial(jax.tree_util.register_dataclass,
         data_fields=["positions", "seq_ids", "cached_lens", "block_tables", "query_tiles"],
         meta_fields=["block_size", "pages_per_chunk", "token_block", "new_block", "query_tile"])
@dataclass(frozen=True)
class AttentionMetadata:
    """Per-token attention inputs; a pytree whose sizes and tiling are static (part of the compiled program)."""

    positions: jax.Array  # i32[T]
    seq_ids: jax.Array  # i32[T]; -1 for padding tokens (they attend only among themselves)
    cached_lens: jax.Array  # i32[T]; positions of the token's sequence already in the cache before this step
    block_tables: jax.Array  # i32[T, W]; the token's sequence's block table, W a multiple of pages_per_chunk
    block_size: int
    pages_per_chunk: int  # pages of context read per loop iteration
    token_block: int = 16  # tokens that walk their cached contexts together (a power of two)
    new_block: int = 32  # query (and key) block of the attention among a step's own tokens
    query_tile: int = 0  # > 0: tokens per query tile of the Pallas kernel (GPU), which then does it all
    query_tiles: jax.Array | None = None  # i32[tiles, 2]: first token and token count (attention_kernel.py)


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
    if meta.query_tile:
        return paged_attention_kernel(q, k_cache, v_cache, layer, meta, scale=scale, sliding_window=sliding_window,
                                      softcap=softcap)
    t, h, d = q.shape
    kv = k_new.shape[1]
    qg = q.reshape(t, kv, h // kv, d).transpose(1, 0, 2, 3)  # [KV, T, G, D]

    def scores(queries: jax.Array, keys: jax.Array, equation: str) -> jax.Array:
        s = jnp.einsum(equation, queries, keys, preferred_element_type=jnp.float32) * scale
        return s if softcap is None else softcap * jnp.tanh(s / softcap)

    def in_window(query_pos: jax.Array, key_pos: jax.Array) -> jax.Array:  # -> [queries, keys]
        if sliding_window is None:
            return jnp.ones((), bool)
        return (query_pos[:, None] - key_pos[None, :]) < sliding_window

    state = _attend_new_tokens(qg, k_new, v_new, meta, scores, in_window)
    m, l, acc = _walk_cached_context(qg, k_cache, v_cache, layer, meta, state, scores, in_window)
    out = acc / l[..., None]  # [KV, T, G, D]
    return out.transpose(1, 0, 2, 3).reshape(t, h, d).astype(q.dtype)


def _walk_cached_context(qg, k_cache, v_cache, layer, meta: AttentionMetadata, state, scores, in_window):
    """Fold every token's cached context into its online-softmax state, in pure JAX: per block of
    tokens, a chunk of pages at a time for as many chunks as the block's own longest context needs.
    Fresh prefill tokens cost nothing here, and a prefill step that also carries decodes does not
    make all its tokens walk the decodes' contexts."""
    kv, t, _, d = qg.shape
    pos = meta.positions
    bs, ppc = meta.block_size, meta.pages_per_chunk
    chunk = bs * ppc
    tb = math.gcd(t, meta.token_block)

    def visit_block(b, state):
        start = b * tb
        q_b = jax.lax.dynamic_slice_in_dim(qg, start, tb, axis=1)  # [KV, tb, G, D]
        pos_b, cached_b = (jax.lax.dynamic_slice_in_dim(x, start, tb) for x in (pos, meta.cached_lens))
        tables_b = jax.lax.dynamic_slice_in_dim(meta.block_tables, start, tb, axis=0)

        def visit(j, block_state):
            blocks = jax.lax.dynamic_slice_in_dim(tables_b, j * ppc, ppc, axis=1)  # [tb, P]
            keys = gather_blocks(k_cache, layer, blocks, bs).reshape(kv, tb, chunk, d)
            vals = gather_blocks(v_cache, layer, blocks, bs).reshape(kv, tb, chunk, d)
            key_pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)
            ok = (key_pos[None, :] < cached_b[:, None]) & in_window(pos_b, key_pos)
            s = jnp.where(ok[None, :, None, :], scores(q_b, keys, "ktgd,ktcd->ktgc"), MASKED)
            return fold(block_state, s, lambda p: jnp.einsum("ktgc,ktcd->ktgd", p, vals.astype(jnp.float32)))

        block_state = tuple(jax.lax.dynamic_slice_in_dim(x, start, tb, axis=1) for x in state)
        block_state = jax.lax.fori_loop(0, (cached_b.max() + chunk - 1) // chunk, visit, block_state)
        return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, start, axis=1) for x, y in zip(state, block_state))

    return jax.lax.fori_loop(0, t // tb, visit_block, state)


def _attend_new_tokens(qg, k_new, v_new, meta: AttentionMetadata, scores, in_window):
    """Online-softmax state (m, l, acc) of every token over this step's own tokens (same sequence,
    causal), per block of meta.new_block queries: the diagonal block first (each token sees itself, so
    m is finite after it and masked keys weigh 0), then only the earlier key blocks back to where
    the block's first sequence starts. A prefill step of many short prompts thus skips most of the dense [T, T]."""
    kv, t, g, d = qg.shape
    qb = math.gcd(t, meta.new_block)
    pos, seq_ids = meta.positions, meta.seq_ids
    first = jnp.arange(t, dtype=jnp.int32) - (pos - meta.cached_lens)  # each sequence's first token here
    keys_all = k_new.transpose(1, 0, 2)  # [KV, T, D]
    vals_all = v_new.transpose(1, 0, 2).astype(jnp.float32)

    def rows(x, start, axis=0):
        return jax.lax.dynamic_slice_in_dim(x, start, qb, axis=axis)

    def block_state(i):
        start = i * qb
        q_b, pos_b, seq_b = rows(qg, start, 1), rows(pos, start), rows(seq_ids, start)

        def block_scores(j):
            k_start = j * qb
            k_pos, k_seq = rows(pos, k_start), rows(seq_ids, k_start)
            ok = (seq_b[:, None] == k_seq[None, :]) & (k_pos[None, :] <= pos_b[:, None]) & in_window(pos_b, k_pos)
            s = scores(q_b, rows(keys_all, k_start, 1), "ktgd,kcd->ktgc")
            return jnp.where(ok[None, :, None, :], s, MASKED), rows(vals_all, k_start, 1)

        def visit(j, state):
            s, vals = block_scores(j)
            return fold(state, s, lambda p: jnp.einsum("ktgc,kcd->ktgd", p, vals))

        diagonal = visit(i, (jnp.full((kv, qb, g), MASKED), jnp.zeros((kv, qb, g)), jnp.zeros((kv, qb, g, d))))
        if qb == t:  # the only block has no earlier ones
            return diagonal
        return jax.lax.fori_loop(rows(first, start).min() // qb, i, visit, diagonal)

    if qb == t:  # one block: no loops at all (on GPU each loop iteration syncs with the host)
        return block_state(0)

    def query_block(i, state):
        return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, i * qb, axis=1) for x, y in zip(state, block_state(i)))

    state = (jnp.zeros((kv, t, g), jnp.float32), jnp.zeros((kv, t, g), jnp.float32),
             jnp.zeros((kv, t, g, d), jnp.float32))
    return jax.lax.fori_loop(0, t // qb, query_block, state)

"""The cached-context half of paged attention as a Pallas (Triton) kernel, for GPUs.

One program per (token, kv head) reads only its own sequence's pages, `pages_per_chunk` pages per
loop iteration, straight from the stacked cache: no gathered copy of the context in device memory
and no padding to the longest context in the step (the pure-JAX walk in attention.py pays both).
It returns the online-softmax state (max, sum, weighted values) that attention.py merges with the
state over the step's own tokens. A small step (few programs) also splits each context among
several programs and merges their states here, so the GPU has enough loads in flight.
Elsewhere than on a GPU it runs in Pallas' interpret mode (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nanovllm_jax.layers.online_softmax import MASKED, fold, merge

if TYPE_CHECKING:
    from nanovllm_jax.layers.attention import AttentionMetadata

EXACT = jax.lax.Precision.HIGHEST  # f32 caches: IEEE dots, not Triton's default TF32 (no effect on bf16)
MIN_DOT_ROWS = 16  # Triton's dot needs at least 16 rows: the query heads of a kv head are padded up to it


@dataclass(frozen=True)
class KernelTuning:
    """Launch settings of the kernel (measured on an H200: benchmarks/gpu-h200.md)."""

    key_tile_bytes: int = 16 << 10  # keys (and values) per iteration
    splits: int = 4  # programs sharing one (token, kv head)'s context, their states merged after...
    split_below: int = 8192  # ...while the grid has fewer programs than this (small steps, the tail of a run)
    num_warps: int | None = 4  # None: Triton's defaults (4 warps, 3 stages)
    num_stages: int | None = 2
    # Keys as one [keys, dim] gather with each row's page looked up, instead of a [pages, block, dim]
    # gather reshaped: not yet timed on a GPU (gpu_kernel_sweep.py does).
    row_gather: bool = False


TUNING = KernelTuning()


def context_attention(qg: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int,
                      meta: AttentionMetadata, *,
                      scale: float, sliding_window: int | jax.Array | None, softcap: float | None,
                      tuning: KernelTuning | None = None):
    """qg [KV, T, G, D] over each token's cached context (positions < meta.cached_lens, inside the
    window) in k/v_cache [L, KV, slots, D] at `layer` -> f32 state (m [KV,T,G], l [KV,T,G], acc [KV,T,G,D])."""
    kv, t, g, d = qg.shape
    tuning = tuning or TUNING
    splits = max(1, min(tuning.splits, tuning.split_below // (t * kv)))
    num_layers, _, slots, _ = k_cache.shape
    bs = meta.block_size
    # A power of two no larger than pages_per_chunk (a power of two dividing the table width).
    page_bytes = bs * d * k_cache.dtype.itemsize
    pages = min(meta.pages_per_chunk, max(tuning.key_tile_bytes // page_bytes, MIN_DOT_ROWS // bs, 1))
    pages = 1 << (pages.bit_length() - 1)
    blocks = slots // bs
    rows = max(MIN_DOT_ROWS, pl.next_power_of_2(g))
    q = jnp.pad(qg.transpose(1, 0, 2, 3), ((0, 0), (0, 0), (0, rows - g), (0, 0))).astype(k_cache.dtype)
    # [L * KV * blocks, bs, D]: page (layer, head, block) is row (layer * KV + head) * blocks + block.
    k_pages, v_pages = (c.reshape(num_layers * kv * blocks, bs, d) for c in (k_cache, v_cache))
    first_page = jnp.asarray(layer, jnp.int32) * (kv * blocks)
    tables = meta.block_tables + first_page
    lo = jnp.zeros_like(meta.positions) if sliding_window is None else \
        jnp.maximum(meta.positions - sliding_window + 1, 0)
    bounds = jnp.stack([lo, meta.cached_lens], axis=1)  # keys at positions [lo, cached_len)

    kernel = partial(_kernel, pages=pages, block_size=bs, blocks_per_head=blocks, heads=g, splits=splits,
                     row_gather=tuning.row_gather, scale=scale, softcap=softcap)
    whole = pl.BlockSpec(k_pages.shape, lambda i, h, s: (0, 0, 0))
    m, l, acc = pl.pallas_call(
        kernel,
        grid=(t, kv, splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0)),
            whole, whole,
            pl.BlockSpec((None, tables.shape[1]), lambda i, h, s: (i, 0)),
            pl.BlockSpec((None, 2), lambda i, h, s: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (s, h, i, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (s, h, i, 0)),
            pl.BlockSpec((None, None, None, rows, d), lambda i, h, s: (s, h, i, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, kv, t, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, kv, t, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, kv, t, rows, d), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=jax.default_backend() != "gpu",
        name="paged_context_attention",
    )(q, k_pages, v_pages, tables, bounds)
    m, l, acc = m[..., :g], l[..., :g], acc[..., :g, :]  # the padding rows were never written
    if splits == 1:
        return m[0], l[0], acc[0]
    return merge(m, l, acc)


def _kernel(q_ref, k_ref, v_ref, tables_ref, bounds_ref, m_ref, l_ref, acc_ref, *, pages: int, block_size: int,
            blocks_per_head: int, heads: int, splits: int, row_gather: bool, scale: float, softcap: float | None):
    chunk = pages * block_size
    q = q_ref[...]
    lo, hi = bounds_ref[0], bounds_ref[1]
    head_first_page = pl.program_id(1) * blocks_per_head

    def visit(j, state):
        if row_gather:
            key = jnp.arange(chunk, dtype=jnp.int32)
            page, offset = tables_ref[j * pages + key // block_size] + head_first_page, key % block_size
            keys, vals = k_ref[page, offset], v_ref[page, offset]
        else:
            ids = tables_ref[pl.ds(j * pages, pages)] + head_first_page
            keys = k_ref[ids].reshape(chunk, q.shape[-1])
            vals = v_ref[ids].reshape(chunk, q.shape[-1])
        s = jnp.dot(q, keys.T, precision=EXACT, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        key_pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)
        s = jnp.where(((key_pos >= lo) & (key_pos < hi))[None, :], s, MASKED)
        return fold(state, s, lambda p: jnp.dot(p.astype(vals.dtype), vals, precision=EXACT,
                                                preferred_element_type=jnp.float32))

    rows, d = q.shape
    # Every visited chunk holds at least one key in [lo, hi), so m is finite after the first visit
    # and masked keys weigh exp(MASKED - m) = 0. No keys: no visits, and the state weighs 0 when merged.
    state = (jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, d), jnp.float32))
    first, end = lo // chunk, jnp.where(lo < hi, (hi + chunk - 1) // chunk, 0)
    per_split = (end - first + splits - 1) // splits
    start = first + pl.program_id(2) * per_split
    m, l, acc = jax.lax.fori_loop(start, jnp.minimum(start + per_split, end), visit, state)
    real = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) < heads  # padding rows: no writes
    plgpu.store(m_ref, m, mask=real)
    plgpu.store(l_ref, l, mask=real)
    plgpu.store(acc_ref, acc, mask=real[:, None])

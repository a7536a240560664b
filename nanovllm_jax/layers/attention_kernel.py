"""Paged attention as one Pallas (Triton) kernel, for GPUs.

The model writes a step's K/V into the cache before attention, so every token's keys (its cached
context and this step's own tokens up to itself) are one range of its sequence's pages. One
program per (query tile, kv head) reads that range straight from the stacked cache, a chunk of
pages per loop iteration: no gathered copy, no padding to the longest context in the step, and no
XLA loop (on a GPU each iteration of a loop with a data-dependent trip count waits for the device).
A query tile is up to `query_tile` consecutive new tokens of one sequence; its rows in the dots are
those tokens times the query heads of the kv head, so a prefill chunk reads its pages once per
tile, and a decode token is a tile of its own. A step with few programs also splits each key range
among several programs and merges their states here, so the GPU has enough loads in flight.
Elsewhere than on a GPU it runs in Pallas' interpret mode (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nanovllm_jax.layers.online_softmax import MASKED, fold, merge

if TYPE_CHECKING:
    from nanovllm_jax.layers.attention import AttentionMetadata

EXACT = jax.lax.Precision.HIGHEST  # f32 caches: IEEE dots, not Triton's default TF32 (no effect on bf16)
MIN_DOT_ROWS = 16  # Triton's dot needs at least 16 rows (and columns)


@dataclass(frozen=True)
class KernelTuning:
    """Launch settings of the kernel (measured on an H200: benchmarks/gpu-h200.md)."""

    key_tile_bytes: int = 16 << 10  # keys (and values) per iteration
    splits: int = 4  # programs sharing one (tile, kv head)'s keys, their states merged after...
    split_below: int = 8192  # ...while the grid has fewer programs than this (small steps, the tail of a run)
    num_warps: int | None = 4  # None: Triton's defaults (4 warps, 3 stages)
    num_stages: int | None = 2
    decode_rows: int = MIN_DOT_ROWS  # dot rows per program in steps of at most one token per sequence
    prefill_rows: int = 64  # ... in steps with more tokens than sequences, at head_dim 128 (not yet timed)


TUNING = KernelTuning()


def query_tile(tokens: int, seqs: int, group: int, head_dim: int, tuning: KernelTuning | None = None) -> int:
    """Tokens per query tile for steps of `tokens` (bucket) and `seqs` (bucket), `group` query heads
    per kv head: a power of two no larger than the step. A program holds its [rows, head_dim] f32
    output in registers: prefill rows shrink with head dims over 128."""
    tuning = tuning or TUNING
    rows = tuning.decode_rows if tokens <= seqs else max(MIN_DOT_ROWS, tuning.prefill_rows * 128 // max(head_dim, 128))
    tile = max(1, rows // pl.next_power_of_2(group))
    return min(tile, 1 << (tokens.bit_length() - 1))


def num_tiles(tokens: int, seqs: int, tile: int) -> int:
    """Tiles a step can need: a sequence of n new tokens takes ceil(n / tile) of them."""
    return min(tokens, tokens // tile + seqs)


def pack_query_tiles(query_start: np.ndarray, tokens: int, seqs: int, tile: int) -> np.ndarray:
    """[num_tiles, 2]: each tile's first token and token count (each sequence's new tokens in tiles
    from its first one); unused rows are (0, 0)."""
    new = np.diff(query_start)
    per_seq = -(-new // tile)
    seq = np.repeat(np.arange(len(new)), per_seq)
    nth = np.arange(len(seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    tiles = np.zeros((num_tiles(tokens, seqs, tile), 2), np.int32)
    tiles[: len(seq), 0] = query_start[seq] + nth * tile
    tiles[: len(seq), 1] = np.minimum(tile, new[seq] - nth * tile)
    return tiles


def paged_attention_kernel(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int,
                           meta: AttentionMetadata, *, scale: float, sliding_window: int | jax.Array | None,
                           softcap: float | None, tuning: KernelTuning | None = None) -> jax.Array:
    """q [T, H, D] over each token's keys (positions <= its own, inside the window) in k/v_cache
    [L, KV, slots, D] at `layer`, this step's K/V already written there -> [T, H, D] in q's dtype.
    Padding tokens (seq_ids < 0, in no tile) get zeros."""
    t, h, d = q.shape
    out_dtype = q.dtype
    tuning = tuning or TUNING
    num_layers, kv, slots, _ = k_cache.shape
    g = h // kv
    group = pl.next_power_of_2(g)  # query heads of a kv head, padded so the tile's rows are a power of two
    tile, tiles = meta.query_tile, meta.query_tiles
    splits = max(1, min(tuning.splits, tuning.split_below // (tiles.shape[0] * kv)))
    bs = meta.block_size
    # Keys per iteration: whole pages while they fit the key tile (a power of two of them, no more than
    # pages_per_chunk, which divides the table width), else a part of one page (a power of two
    # dividing it: large blocks would overflow shared memory).
    tile_keys = max(tuning.key_tile_bytes // (d * k_cache.dtype.itemsize), MIN_DOT_ROWS)
    pages = min(meta.pages_per_chunk, max(tile_keys // bs, 1))
    pages = 1 << (pages.bit_length() - 1)
    chunk = pages * bs if tile_keys >= bs else 1 << (tile_keys.bit_length() - 1)
    blocks = slots // bs
    q = q.reshape(t, kv, g, d)
    if group != g:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, group - g), (0, 0)))
    q = q.astype(k_cache.dtype)
    # [L * KV * blocks, bs, D]: page (layer, head, block) is row (layer * KV + head) * blocks + block.
    k_pages, v_pages = (c.reshape(num_layers * kv * blocks, bs, d) for c in (k_cache, v_cache))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)  # the kernel offsets page ids by it (no per-layer table copy)

    pos = meta.positions
    lows = jnp.zeros_like(pos) if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)  # lowest key

    def whole(shape):
        return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))

    state_shapes = [(splits, t, kv, group), (splits, t, kv, group), (splits, t, kv, group, d)]
    kernel = partial(_kernel, tile=tile, pages=pages, chunk=chunk, block_size=bs, blocks_per_head=blocks, splits=splits,
                     scale=scale, softcap=softcap)
    m, l, acc = pl.pallas_call(
        kernel,
        grid=(tiles.shape[0], kv, splits),
        in_specs=[pl.BlockSpec((None, 2), lambda i, *_: (i, 0)),
                  *(whole(x.shape) for x in (layer, q, k_pages, v_pages, meta.block_tables, pos, lows))],
        out_specs=[whole(shape) for shape in state_shapes],
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32) for shape in state_shapes],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=jax.default_backend() != "gpu",
        name="paged_attention",
    )(tiles, layer, q, k_pages, v_pages, meta.block_tables, pos, lows)
    m, l, acc = merge(m, l, acc) if splits > 1 else (m[0], l[0], acc[0])
    out = acc[:, :, :g] / l[:, :, :g, None]
    out = jnp.where((meta.seq_ids >= 0)[:, None, None, None], out, 0)  # padding tokens' rows were never written
    return out.reshape(t, h, d).astype(out_dtype)


def _kernel(tile_ref, layer_ref, q_ref, k_ref, v_ref, tables_ref, pos_ref, low_ref, m_ref, l_ref, acc_ref, *,
            tile: int, pages: int, chunk: int, block_size: int, blocks_per_head: int, splits: int,
            scale: float, softcap: float | None):
    t, kv, group, d = q_ref.shape
    rows = tile * group
    start, count = tile_ref[0], tile_ref[1]
    window = jnp.minimum(start, t - tile)  # `tile` tokens from here hold the tile and stay inside the step
    head = pl.program_id(1)
    q = q_ref[pl.ds(window, tile), head].reshape(rows, d)
    token = window + jnp.arange(tile, dtype=jnp.int32)
    mine = (token >= start) & (token < start + count)  # [tile]: the window's tokens in this tile

    def per_row(ref):
        return jnp.broadcast_to(ref[pl.ds(window, tile)][:, None], (tile, group)).reshape(rows)

    row_pos, row_lo = per_row(pos_ref), per_row(low_ref)
    first_pos = pos_ref[start]  # positions run on within a tile: its keys are [low_ref[start], first_pos + count)
    head_first_page = (layer_ref[0] * kv + head) * blocks_per_head

    def visit(j, state):
        if chunk < block_size:  # a part of one page
            page, offset = tables_ref[start, j * chunk // block_size] + head_first_page, j * chunk % block_size
            keys, vals = k_ref[page, pl.ds(offset, chunk)], v_ref[page, pl.ds(offset, chunk)]
        else:  # whole pages, each key row's page looked up: one [chunk, d] load that feeds the dot (a
            # [pages, block, d] gather reshaped to it ran at 2.3 TB/s on an H200, this at 3.6-3.7)
            key = jnp.arange(chunk, dtype=jnp.int32)
            page, offset = tables_ref[start, j * pages + key // block_size] + head_first_page, key % block_size
            keys, vals = k_ref[page, offset], v_ref[page, offset]
        s = jnp.dot(q, keys.T, precision=EXACT, preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        key_pos = j * chunk + jnp.arange(chunk, dtype=jnp.int32)
        s = jnp.where((key_pos[None, :] >= row_lo[:, None]) & (key_pos[None, :] <= row_pos[:, None]), s, MASKED)
        return fold(state, s, lambda p: jnp.dot(p.astype(vals.dtype), vals, precision=EXACT,
                                                preferred_element_type=jnp.float32))

    # A row's masked keys weigh exp(MASKED - m) = 0 once m is finite, i.e. from its first own key on:
    # what it summed before (while m was MASKED) is scaled by exp(MASKED - m) = 0 then. Every tile
    # row sees at least itself; a split program whose share a row does not reach leaves m = MASKED
    # there, and that state weighs 0 in the merge.
    state = (jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, d), jnp.float32))
    first, end = low_ref[start] // chunk, jnp.where(count > 0, (first_pos + count + chunk - 1) // chunk, 0)
    per_split = (end - first + splits - 1) // splits
    split = pl.program_id(2)
    begin = first + split * per_split
    m, l, acc = jax.lax.fori_loop(begin, jnp.minimum(begin + per_split, end), visit, state)
    real = jnp.broadcast_to(mine[:, None], (tile, group))
    plgpu.store(m_ref.at[split, pl.ds(window, tile), head], m.reshape(tile, group), mask=real)
    plgpu.store(l_ref.at[split, pl.ds(window, tile), head], l.reshape(tile, group), mask=real)
    plgpu.store(acc_ref.at[split, pl.ds(window, tile), head], acc.reshape(tile, group, d),
                mask=jnp.broadcast_to(real[:, :, None], (tile, group, d)))

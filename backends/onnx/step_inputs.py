"""Host-side packing of one step (or a group of its sequences) into the graph's attention inputs.

Attention runs per sequence on a [S, Q] query layout padded to the longest query Q, so the runner
feeds decodes (Q = 1) and prefill chunks as separate groups: a mixed step would otherwise pad every
decode row up to the prefill chunk's length.
"""
from __future__ import annotations

import numpy as np

from backends.onnx.graph import MASKED
from nanovllm_jax.runner import StepBatch


def row_groups(batch: StepBatch, max_padding: float = 2.0) -> list[np.ndarray]:
    """Sequence rows in groups that each run as one graph call: the decode rows, then prefill chunks
    (longest first) in as few groups as keep each group's padded query size within `max_padding` times
    its real token count. Every extra group costs one more pass over the weights."""
    query_lens = np.diff(batch.query_start)
    groups = [np.flatnonzero(query_lens == 1)]
    prefill = np.flatnonzero(query_lens > 1)
    current: list[int] = []
    for row in prefill[np.argsort(-query_lens[prefill], kind="stable")]:
        tokens = query_lens[current].sum() + query_lens[row]
        if current and (len(current) + 1) * query_lens[current[0]] > max_padding * tokens:
            groups.append(np.array(current))
            current = []
        current.append(row)
    groups.append(np.array(current, dtype=np.int64))
    return [g for g in groups if g.size]


def token_rows(batch: StepBatch, rows: np.ndarray) -> np.ndarray:
    """Flat step indices of the new tokens of `rows`, in row order."""
    return np.concatenate([np.arange(batch.query_start[r], batch.query_start[r + 1]) for r in rows])


def pack_group(batch: StepBatch, rows: np.ndarray, block_size: int, group_size: int,
               sliding_window: int | None = None) -> dict[str, np.ndarray]:
    """Graph inputs (all but the KV cache) for the sequences `rows` of `batch`; with a sliding window
    also the sliding layers' mask."""
    tokens = token_rows(batch, rows)
    query_lens = (batch.query_start[rows + 1] - batch.query_start[rows]).astype(np.int64)
    cached = batch.context_lens[rows].astype(np.int64) - query_lens  # context rows already in the cache
    local_start = np.concatenate([[0], np.cumsum(query_lens)[:-1]])
    num_seqs, q_max = len(rows), int(query_lens.max())
    num_blocks = max(-(-int(cached.max()) // block_size), 1)  # keep the gathered blocks non-empty

    j = np.arange(q_max)
    q_index = np.where(j[None, :] < query_lens[:, None], local_start[:, None] + j[None, :], 0)  # [S, Q]
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
    out_index = seq_of_token * q_max + (np.arange(len(tokens)) - local_start[seq_of_token])
    block_ids = np.maximum(batch.block_tables[rows, :num_blocks], 0).astype(np.int64)  # -1 pads read block 0

    # keys: the cached columns (valid below `cached`), then this step's rows (causal within the chunk)
    cols = np.arange(num_blocks * block_size)
    cached_ok = np.broadcast_to((cols[None, :] < cached[:, None])[:, None, :], (num_seqs, q_max, len(cols)))
    own_ok = np.broadcast_to(j[None, :, None] >= j[None, None, :], (num_seqs, q_max, q_max))
    allowed = np.concatenate([cached_ok, own_ok], axis=2)  # [S, Q, C]
    inputs = {}
    if sliding_window is not None:  # a key counts if it is one of the query's last `window` positions
        query_pos = cached[:, None] + j[None, :]  # [S, Q]
        key_pos = np.concatenate([np.broadcast_to(cols, (num_seqs, len(cols))), cached[:, None] + j[None, :]], axis=1)
        recent = query_pos[:, :, None] - key_pos[:, None, :] < sliding_window
        inputs["attn_bias_local"] = _bias(allowed & recent, group_size)

    return inputs | {
        "input_ids": batch.input_ids[tokens].astype(np.int64),
        "positions": batch.positions[tokens].astype(np.int64),
        "q_index": q_index,
        "out_index": out_index,
        "block_ids": block_ids,
        "attn_bias": _bias(allowed, group_size),
        "logits_indices": (local_start + query_lens - 1).astype(np.int64),
    }


def _bias(allowed: np.ndarray, group_size: int) -> np.ndarray:
    """Additive mask [1, S, Q*G, C] from allowed [S, Q, C]; rows q*G+g, as the G heads of a KV head share it."""
    bias = np.where(allowed, np.float32(0), np.float32(MASKED)).astype(np.float32)
    return np.repeat(bias, group_size, axis=1)[None]

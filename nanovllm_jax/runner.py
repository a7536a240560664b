"""The seam between the host scheduler and a backend: one step in as numpy arrays, tokens out.

A step is submitted before the previous one's tokens are read back (so the host schedules the
next step while the device runs this one): a decode row whose input is the token the previous
step sampled names that step's row in `prev_rows`, and the backend takes the token from there.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np


# Stop and EOS ids a request may have masked while below min_tokens: one fixed width keeps the shapes of
# the JAX backend's programs, all compiled at warm-up (every backend takes the same requests)
MAX_BANNED_IDS = 32


# SamplingBatch's float fields, in one order for whoever builds or packs them together, each with the value
# that changes nothing (what padding rows hold)
SAMPLING_FLOAT_NEUTRAL = {"temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                          "presence_penalty": 0.0, "frequency_penalty": 0.0}
SAMPLING_FLOAT_FIELDS = tuple(SAMPLING_FLOAT_NEUTRAL)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-sequence sampling parameters, one row per scheduled sequence."""

    temperature: np.ndarray  # f32[S]; 0 means greedy
    top_k: np.ndarray  # i32[S]; 0 means off
    top_p: np.ndarray  # f32[S]; 1 means off
    min_p: np.ndarray  # f32[S]; 0 means off
    seeds: np.ndarray  # u32[S]; the RNG key is (seed, context_len), so a row samples alike in any batch
    repetition_penalty: np.ndarray  # f32[S]; over prompt and output tokens
    presence_penalty: np.ndarray  # f32[S]; over output tokens
    frequency_penalty: np.ndarray  # f32[S]; over output tokens
    prompt_lens: np.ndarray  # i32[S]; context tokens past this are outputs (for the penalties)
    banned_token_ids: np.ndarray  # i32[S, K <= MAX_BANNED_IDS]; -1 padded; stop ids masked while below min_tokens
    num_logprobs: int  # top-N logprobs to return (max over rows); 0: no row wants logprobs at all

    @property
    def needs_penalties(self) -> bool:
        return bool(
            np.any(self.repetition_penalty != 1.0)
            or np.any(self.presence_penalty != 0.0)
            or np.any(self.frequency_penalty != 0.0)
        )


@dataclass(frozen=True)
class StepBatch:
    """One scheduled step. T new tokens over S sequences; every sequence gets one logits row.

    The runner writes each new token's K/V (and token id) at `slot_mapping`, attends over the
    sequence's paged context through `block_tables`, and samples rows where `needs_sample` is set
    (a partial prefill chunk has nothing to sample yet).
    """

    input_ids: np.ndarray  # i32[T]; where prev_rows >= 0, a placeholder
    prev_rows: np.ndarray  # i32[T]; -1, or the row of the previous step whose sampled token is the input
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]; block_id * block_size + offset
    query_start: np.ndarray  # i32[S+1]; sequence s owns tokens query_start[s]:query_start[s+1]
    context_lens: np.ndarray  # i32[S]; tokens in cache for s once this step has written
    block_tables: np.ndarray  # i32[S, max_blocks_per_seq]; -1 padded
    logits_indices: np.ndarray  # i32[S]; flat index of each sequence's last new token
    needs_sample: np.ndarray  # bool[S]
    sampling: SamplingBatch

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])


@dataclass(frozen=True)
class StepOutput:
    token_ids: np.ndarray  # i32[S]; meaningful where needs_sample
    logprobs: np.ndarray | None = None  # f32[S]; the sampled token's logprob
    ranks: np.ndarray | None = None  # i32[S]; how many logprobs of the row are >= the sampled token's (vLLM's rank)
    top_token_ids: np.ndarray | None = None  # i32[S, N]
    top_logprobs: np.ndarray | None = None  # f32[S, N]


class PendingOutput(Protocol):
    def result(self) -> StepOutput: ...


class ModelRunner(Protocol):
    """What a backend implements. It owns the KV cache; the block manager owns who uses which block."""

    num_kvcache_blocks: int
    vocab_size: int

    def submit(self, batch: StepBatch) -> PendingOutput:
        """Start the step (after every step submitted before it) and return at once, or when done."""
        ...


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, itemsize: int) -> int:
    """Memory of one KV block: its K and V rows in every layer, and its int32 token ids (for penalties)."""
    return 2 * num_layers * num_kv_heads * block_size * head_dim * itemsize + block_size * 4


@contextmanager
def allocating_kv_cache(num_blocks: int, block_size: int, block_bytes: int,
                        out_of_memory: tuple[type[Exception], ...] = (MemoryError, ValueError)) -> Iterator[None]:
    """Around a backend's KV cache allocation: more slots than int32 holds, or more memory than there is,
    is a ValueError saying so (numpy raises MemoryError, or ValueError past its largest array)."""
    if num_blocks * block_size >= 2**31 - 1:  # slots are int32, and num_slots itself marks a dropped write
        raise ValueError(f"{num_blocks} KV blocks of {block_size} tokens exceed 2**31 - 1 slots")
    try:
        yield
    except out_of_memory as e:
        raise ValueError(f"a KV cache of {num_blocks} blocks ({num_blocks * block_bytes / 2**30:.1f} GiB) does not fit "
                         f"in memory: lower num_kvcache_blocks or kv_cache_memory_bytes ({e})") from None


@dataclass(frozen=True)
class Done:
    output: StepOutput

    def result(self) -> StepOutput:
        return self.output


def read_contexts(token_cache: np.ndarray, batch: StepBatch, block_size: int) -> list[np.ndarray]:
    """Each sequence's context token ids, read from a host backend's token cache through its block table."""
    contexts = []
    for block_table, context_len in zip(batch.block_tables, batch.context_lens.tolist()):
        pos = np.arange(context_len)
        contexts.append(token_cache[block_table[pos // block_size] * block_size + pos % block_size])
    return contexts


class HostRunner:
    """Base of backends that compute a step on the host, inside submit: `execute` sees real input ids."""

    _last_tokens = np.zeros(0, np.int32)

    def execute(self, batch: StepBatch) -> StepOutput:
        raise NotImplementedError

    def submit(self, batch: StepBatch) -> Done:
        from_previous = batch.prev_rows >= 0
        if from_previous.any():
            ids = np.where(from_previous, self._last_tokens[np.maximum(batch.prev_rows, 0)], batch.input_ids)
            batch = replace(batch, input_ids=ids.astype(np.int32))
        output = self.execute(batch)
        self._last_tokens = output.token_ids
        return Done(output)

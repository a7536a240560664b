"""One step's inputs as ONE int32 array: packed on the host, unpacked by static offsets on device.

A single host->device transfer per step carries the token metadata, the paged-attention metadata
and every sampling parameter (floats and u32 seeds travel as their bit patterns). The per-sequence
section comes first and depends only on the sequence bucket, so the forward program can hand
that prefix to a sampler program shared by every token bucket with the same sequence bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.layers.attention_kernel import num_tiles, pack_query_tiles
from nanovllm_jax.layers.sampler import SamplingInputs
from nanovllm_jax.models import ForwardInputs
from nanovllm_jax.runner import SAMPLING_FLOAT_FIELDS, SAMPLING_FLOAT_NEUTRAL, StepBatch

_SEQ_INT_FIELDS = ("context_lens", "logits_indices", "prompt_lens", "top_k", "seeds")
_SEQ_FLAGS = ("use_penalties", "use_logprobs")
_TOKEN_FIELDS = ("input_ids", "prev_rows", "positions", "slot_mapping", "seq_ids", "cached_lens")


class StepInputs(NamedTuple):
    forward: ForwardInputs  # input_ids still hold placeholders where prev_rows >= 0
    prev_rows: jax.Array  # i32[T]
    seq_section: jax.Array  # the packed per-sequence prefix, for the sampler program


class SamplerInputs(NamedTuple):
    sampling: SamplingInputs
    block_tables: jax.Array  # i32[S, W] (for the penalties' context read)


Span = tuple[int, int, tuple[int, ...]]  # a field's start, end and shape in the packed array


def _spans(shapes: dict[str, tuple[int, ...]], start: int = 0) -> dict[str, Span]:
    spans = {}
    for name, shape in shapes.items():
        end = start + math.prod(shape)
        spans[name], start = (start, end, shape), end
    return spans


def _fields(buf, spans: dict[str, Span]):
    """`field(name)`: the named field of the packed `buf`, viewed in its shape."""
    def field(name: str):
        start, end, shape = spans[name]
        return buf[start:end].reshape(shape)
    return field


@dataclass(frozen=True)
class SeqLayout:
    """The per-sequence section: sampling parameters, block tables, context lengths, flags."""

    seqs: int  # S bucket
    table_width: int  # block-table width, a multiple of every pages_per_chunk in use
    max_banned: int  # banned-id columns
    block_size: int

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: (self.seqs,) for name in _SEQ_INT_FIELDS + SAMPLING_FLOAT_FIELDS}
        shapes |= {"block_tables": (self.seqs, self.table_width), "banned": (self.seqs, self.max_banned)}
        return shapes | {name: () for name in _SEQ_FLAGS}

    @cached_property
    def spans(self) -> dict[str, Span]:
        return _spans(self.shapes)

    @cached_property
    def size(self) -> int:
        return max(end for _, end, _ in self.spans.values())

    def pack(self, buf: np.ndarray, batch: StepBatch) -> None:
        field = _fields(buf, self.spans)
        s = batch.num_seqs
        width = min(batch.block_tables.shape[1], self.table_width)
        field("block_tables")[:s, :width] = np.maximum(batch.block_tables[:, :width], 0)  # -1 reads block 0, masked
        field("context_lens")[:s] = batch.context_lens
        field("logits_indices")[:s] = batch.logits_indices
        sp = batch.sampling
        field("prompt_lens")[:s] = sp.prompt_lens
        field("top_k")[:s] = sp.top_k
        field("seeds")[:s] = sp.seeds.astype(np.uint32).view(np.int32)
        for name, pad in SAMPLING_FLOAT_NEUTRAL.items():
            values = np.full(self.seqs, pad, np.float32)
            values[:s] = getattr(sp, name)
            field(name)[:] = values.view(np.int32)
        banned = field("banned")
        banned[:] = -1
        banned[:s, : sp.banned_token_ids.shape[1]] = sp.banned_token_ids
        field("use_penalties")[...] = sp.needs_penalties
        field("use_logprobs")[...] = sp.num_logprobs > 0

    def unpack(self, packed: jax.Array) -> SamplerInputs:
        field = _fields(packed, self.spans)

        def as_float(name: str) -> jax.Array:
            return jax.lax.bitcast_convert_type(field(name), jnp.float32)

        sampling = SamplingInputs(
            temperature=as_float("temperature"), top_k=field("top_k"), top_p=as_float("top_p"),
            min_p=as_float("min_p"), seeds=jax.lax.bitcast_convert_type(field("seeds"), jnp.uint32),
            repetition_penalty=as_float("repetition_penalty"), presence_penalty=as_float("presence_penalty"),
            frequency_penalty=as_float("frequency_penalty"), prompt_lens=field("prompt_lens"),
            context_lens=field("context_lens"), banned_token_ids=field("banned"),
            use_penalties=field("use_penalties"), use_logprobs=field("use_logprobs"),
        )
        return SamplerInputs(sampling, field("block_tables"))


@dataclass(frozen=True)
class StepLayout:
    """The whole packed step: the SeqLayout section, then per-token fields (and the kernel's query tiles)."""

    tokens: int  # T bucket
    seq: SeqLayout
    pages_per_chunk: int
    num_slots: int  # padding tokens write to this (out-of-range) slot
    token_block: int  # attention tiling: see AttentionMetadata
    new_block: int
    query_tile: int  # > 0: the attention kernel's tokens per tile (AttentionMetadata.query_tile)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: (self.tokens,) for name in _TOKEN_FIELDS}
        if self.query_tile:
            shapes["query_tiles"] = (num_tiles(self.tokens, self.seq.seqs, self.query_tile), 2)
        return shapes

    @cached_property
    def spans(self) -> dict[str, Span]:
        return _spans(self.shapes, start=self.seq.size)

    @cached_property
    def size(self) -> int:
        return max(end for _, end, _ in self.spans.values())

    def pack(self, batch: StepBatch) -> np.ndarray:
        buf = np.zeros(self.size, np.int32)
        self.seq.pack(buf, batch)
        field = _fields(buf, self.spans)
        t, s = batch.num_tokens, batch.num_seqs
        new_per_seq = np.diff(batch.query_start)
        seq_ids = np.repeat(np.arange(s, dtype=np.int32), new_per_seq)
        cached = (batch.context_lens - new_per_seq).astype(np.int32)
        field("input_ids")[:t] = batch.input_ids
        field("prev_rows")[:] = -1
        field("prev_rows")[:t] = batch.prev_rows
        field("positions")[:t] = batch.positions
        field("slot_mapping")[:] = self.num_slots
        field("slot_mapping")[:t] = batch.slot_mapping
        field("seq_ids")[:] = -1
        field("seq_ids")[:t] = seq_ids
        field("cached_lens")[:t] = cached[seq_ids]
        if self.query_tile:
            field("query_tiles")[:] = pack_query_tiles(batch.query_start, self.tokens, self.seq.seqs, self.query_tile)
        return buf

    def unpack(self, packed: jax.Array) -> StepInputs:
        field = _fields(packed, self.spans)
        seq = self.seq
        seq_section = packed[: seq.size]
        seq_field = _fields(seq_section, seq.spans)
        seq_ids = field("seq_ids")
        attn = AttentionMetadata(
            positions=field("positions"),
            seq_ids=seq_ids,
            cached_lens=field("cached_lens"),
            block_tables=seq_field("block_tables")[jnp.maximum(seq_ids, 0)],
            block_size=seq.block_size,
            pages_per_chunk=self.pages_per_chunk,
            token_block=self.token_block,
            new_block=self.new_block,
            query_tile=self.query_tile,
            query_tiles=field("query_tiles") if self.query_tile else None,
        )
        forward = ForwardInputs(field("input_ids"), field("slot_mapping"), seq_field("logits_indices"), attn)
        return StepInputs(forward, field("prev_rows"), seq_section)

"""Paged KV-cache bookkeeping with prefix caching (vLLM V1 style).

Full blocks are keyed by a chained xxhash of their tokens and checked against the stored token ids.
As in vLLM, every block holding a hash stays findable: requests that computed one prefix apart (in one
step, before either was cached) each keep a copy, and evicting one leaves the others hits.
A block whose reference count drops to zero joins the free queue but keeps its hash, so it stays a
cache hit until the queue hands it out again (least recently freed first). Blocks never used yet are
handed out before any freed one, and exist as objects only from then on: the bookkeeping grows with
the blocks in use, not with the cache (a small model on a large GPU has millions of blocks).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm_jax.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(prev_hash: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    h = xxhash.xxh3_64()
    if prev_hash is not None:
        h.update(prev_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks = num_blocks
        self.blocks: list[Block] = []  # the blocks used so far; ids 0, 1, ... in order of first use
        self.free_queue: OrderedDict[int, None] = OrderedDict()  # used blocks with no reference
        # hash -> the blocks holding it (a dict as an insertion-ordered set): lookups take the first
        self.hash_to_blocks: dict[int, dict[int, None]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - len(self.blocks) + len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the seq's leading full blocks; the last token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        prev = None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            prev = chain_hash(prev, tokens)
            block_id = next((b for b in self.hash_to_blocks.get(prev, ()) if self.blocks[b].token_ids == tokens), None)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_admit(self, cached: list[int], num_new_tokens: int) -> bool:
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return revived + fresh <= self.num_free_blocks

    def admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> None:
        """Give a waiting seq its cached prefix blocks plus room for its first `num_new_tokens`."""
        assert not seq.block_table
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        if seq.num_preemptions == 0:  # as in vLLM: a resumed request finding its own blocks is no prefix hit
            seq.num_cached_tokens = seq.num_computed_tokens
            if self.enable_prefix_caching:
                self.prefix_query_tokens += len(seq)
                self.prefix_hit_tokens += seq.num_cached_tokens
        self.append_blocks(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_blocks(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self._blocks_to_append(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block())

    def _blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        return self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens whose ids are known."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = seq.block_hashes
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // bs
        if num_full <= len(hashes):  # most steps: a decode inside its last block
            return
        for i in range(len(hashes), num_full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tuple(tokens)
                self.hash_to_blocks.setdefault(h, {})[block.block_id] = None

    def free(self, seq: Sequence) -> None:
        # Tail blocks go first into the queue, so they are evicted before the shared prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. between benchmark runs); only while no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.hash = block.token_ids = None
        self.hash_to_blocks.clear()
        return True

    def _take_free_block(self) -> int:
        if len(self.blocks) < self.num_blocks:
            block_id = len(self.blocks)
            self.blocks.append(Block(block_id))
        else:
            block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            holders = self.hash_to_blocks[block.hash]
            del holders[block_id]
            if not holders:
                del self.hash_to_blocks[block.hash]
        block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

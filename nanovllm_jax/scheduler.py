"""Continuous batching with chunked prefill and recompute preemption.

Each step has a token budget. Running sequences go first (decodes and unfinished prefill chunks, in
arrival order), then waiting ones are admitted while budget, sequence slots and KV blocks last.
When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it waits to be recomputed (its prefix often comes back from the cache).
"""
from __future__ import annotations

from collections import deque

from nanovllm_jax.block_manager import BlockManager
from nanovllm_jax.config import EngineConfig
from nanovllm_jax.sequence import Sequence, SequenceStatus

ScheduledBatch = list[tuple[Sequence, int]]  # (sequence, number of new tokens to compute)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: ScheduledBatch = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = 0 if seq.last_token_in_flight else self._fit(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.block_manager.can_append(seq, num_new):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self.block_manager.append_blocks(seq, num_new)
            scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        # A step that had to preempt has no room to admit anyone.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.block_manager.match_prefix(seq)
            num_new = self._fit(len(seq) - len(cached) * self.block_manager.block_size, budget)
            if num_new == 0 or not self.block_manager.can_admit(cached, num_new):
                break
            self.block_manager.admit(seq, cached, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return scheduled

    def _fit(self, num_tokens: int, budget: int) -> int:
        if self.chunked_prefill:
            return min(num_tokens, budget)
        return num_tokens if num_tokens <= budget else 0

    def mark_computed(self, scheduled: ScheduledBatch) -> None:
        for seq, num_new in scheduled:
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.finish(reason)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1

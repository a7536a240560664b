from __future__ import annotations

import pytest

import nanovllm_jax.block_manager as bm_module
from nanovllm_jax.block_manager import BlockManager
from nanovllm_jax.config import EngineConfig
from nanovllm_jax.sampling_params import SamplingParams
from nanovllm_jax.scheduler import Scheduler
from nanovllm_jax.sequence import Sequence, SequenceStatus


def seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(i, tokens, SamplingParams(), seed=0, max_tokens=64)


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    cached = bm.match_prefix(s)
    bm.admit(s, cached, len(s) - len(cached) * bm.block_size)
    s.num_computed_tokens = len(s)
    bm.cache_full_blocks(s)


def test_fully_cached_prompt_still_computes_its_last_block_token():
    bm = BlockManager(num_blocks=8, block_size=8)
    a = seq(0, list(range(16)))
    run_prefill(bm, a)
    first_block = a.block_table[0]
    bm.free(a)
    b = seq(1, list(range(16)))
    cached = bm.match_prefix(b)
    assert cached == [first_block]  # 16 tokens = 2 full blocks, but the second holds the last token
    bm.admit(b, cached, 8)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8


def test_cache_hit_is_verified_against_stored_tokens(monkeypatch):
    monkeypatch.setattr(bm_module, "chain_hash", lambda prev, tokens: 42)  # every block collides
    bm = BlockManager(num_blocks=8, block_size=8)
    a = seq(0, list(range(17)))
    run_prefill(bm, a)
    assert bm.match_prefix(seq(1, list(range(100, 117)))) == []
    # both blocks hold hash 42: each position takes the one whose tokens match
    assert bm.match_prefix(seq(2, list(range(17)))) == a.block_table[:2]
    assert bm.match_prefix(seq(3, list(range(8)) + list(range(100, 109)))) == a.block_table[:1]


def test_freed_blocks_stay_cache_hits_until_reallocated():
    bm = BlockManager(num_blocks=4, block_size=8)
    a = seq(0, list(range(17)))
    run_prefill(bm, a)
    first_two = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    assert bm.match_prefix(seq(1, list(range(17)))) == first_two
    filler = seq(2, list(range(500, 532)))  # takes all four blocks, evicting the cached ones
    bm.admit(filler, [], 32)
    bm.free(filler)
    assert bm.match_prefix(seq(3, list(range(17)))) == []


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=8)
    a, b = seq(0, list(range(20))), seq(1, list(range(20)))
    run_prefill(bm, a)
    run_prefill(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    bm.free(b)
    assert all(block.ref_count == 0 for block in bm.blocks) and bm.num_free_blocks == 8


def test_never_used_blocks_go_first_and_cost_nothing_until_then():
    bm = BlockManager(num_blocks=10**12, block_size=8)  # one object per block would exhaust memory
    a = seq(0, list(range(17)))
    run_prefill(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert len(bm.blocks) == 3 and bm.num_free_blocks == 10**12
    bm.admit(seq(1, list(range(500, 532))), [], 32)  # fresh blocks, not the freed cached ones
    assert bm.match_prefix(seq(2, list(range(17)))) == cached


def make_scheduler(**kwargs) -> Scheduler:
    config = EngineConfig(backend="mock", **kwargs)
    config.finalize(256)
    return Scheduler(config, BlockManager(config.num_kvcache_blocks or 64, config.kvcache_block_size))


def test_decodes_go_first_and_share_the_budget_with_a_chunked_prefill():
    sched = make_scheduler(max_num_batched_tokens=16, kvcache_block_size=8)
    decoding = seq(0, list(range(5)))
    sched.add(decoding)
    sched.mark_computed(sched.schedule())
    decoding.token_ids.append(7)  # sampled token, now a decode
    sched.add(seq(1, list(range(100, 140))))
    step = sched.schedule()
    assert [(s.seq_id, n) for s, n in step] == [(0, 1), (1, 15)]
    sched.mark_computed(step)
    decoding.token_ids.append(8)
    assert [(s.seq_id, n) for s, n in sched.schedule()] == [(0, 1), (1, 15)]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    sched = make_scheduler(max_num_batched_tokens=256, enable_chunked_prefill=False, max_num_seqs=2)
    for i in range(3):
        sched.add(seq(i, list(range(100))))
    step = sched.schedule()
    assert [(s.seq_id, n) for s, n in step] == [(0, 100), (1, 100)]  # max_num_seqs caps the third


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched = make_scheduler(max_num_batched_tokens=64, kvcache_block_size=8, num_kvcache_blocks=4)
    a, b = seq(0, list(range(16))), seq(1, list(range(100, 116)))
    sched.add(a)
    sched.add(b)
    sched.mark_computed(sched.schedule())
    a.token_ids.append(1)
    b.token_ids.append(2)
    step = sched.schedule()  # a needs a third block: b is preempted
    assert [(s.seq_id, n) for s, n in step] == [(0, 1)]
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b and not b.block_table
    assert sched.num_preemptions == 1


@pytest.mark.parametrize("bad", [0, 3, 12, 7])
def test_block_size_must_be_a_power_of_two_from_8(bad):
    with pytest.raises(ValueError, match="kvcache_block_size"):
        EngineConfig(backend="mock", kvcache_block_size=bad).validate()


def test_a_resumed_request_finding_its_own_blocks_is_no_prefix_hit():
    """As in vLLM, num_cached_tokens and the hit rate count a request's first admission only."""
    bm = BlockManager(num_blocks=8, block_size=8)
    a = seq(0, list(range(17)))
    run_prefill(bm, a)
    bm.free(a)  # preempted: its blocks stay cached
    a.num_preemptions += 1
    cached = bm.match_prefix(a)
    bm.admit(a, cached, 1)
    assert len(cached) == 2 and a.num_computed_tokens == 16
    assert a.num_cached_tokens == 0 and (bm.prefix_hit_tokens, bm.prefix_query_tokens) == (0, 17)


def test_a_copy_of_a_cached_block_stays_a_hit_once_the_first_is_evicted():
    """As in vLLM (its hash map holds every block of a hash): two requests with one prompt in one step
    each compute their own copy of its blocks; evicting the copy found first leaves the other one a hit."""
    bm = BlockManager(num_blocks=6, block_size=8)
    a, b = seq(0, list(range(17))), seq(1, list(range(17)))
    for s in (a, b):  # admitted together: neither finds the other's blocks yet
        bm.admit(s, [], 17)
    for s in (a, b):
        s.num_computed_tokens = 17
        bm.cache_full_blocks(s)
    assert not set(a.block_table) & set(b.block_table)
    b_copy = b.block_table[:2]
    bm.free(a)
    filler = seq(2, list(range(500, 524)))  # takes every free block, evicting a's copy
    bm.admit(filler, [], 24)
    assert bm.match_prefix(seq(3, list(range(17)))) == b_copy
    bm.free(filler)
    bm.free(b)  # freed last: still cached, and evicted only once the filler's blocks are gone
    assert bm.match_prefix(seq(4, list(range(17)))) == b_copy

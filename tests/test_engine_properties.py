"""Random workloads on the mock: every request gets exactly what it gets alone, and nothing leaks."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mock_oracle import mock_generate
from nanovllm_jax import LLM, SamplingParams

VOCAB = 1024


@st.composite
def workloads(draw):
    base = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=48))
    prompts = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):  # share a prefix of the base prompt
            prompt = base[: draw(st.integers(1, len(base)))] + draw(st.lists(st.integers(1, VOCAB - 1), max_size=12))
        else:
            prompt = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=60))
        prompts.append(prompt)
    params = [
        SamplingParams(
            temperature=draw(st.sampled_from([0.0, 1e-44, 0.7, 1.3])),  # below SAMPLING_EPS: greedy
            top_k=draw(st.sampled_from([-1, 5, 2**31])),  # past the vocabulary: off
            top_p=draw(st.sampled_from([1.0, 0.9])),
            seed=draw(st.integers(0, 2**32 - 1)),
            max_tokens=draw(st.integers(1, 24)),
            ignore_eos=draw(st.booleans()),
            repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
            frequency_penalty=draw(st.sampled_from([0.0, 0.5])),
        )
        for _ in prompts
    ]
    block_size = draw(st.sampled_from([8, 16, 32]))
    chunked = draw(st.booleans())
    longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
    min_blocks = -(-longest // block_size)
    engine = dict(
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(1, 96)) if chunked else 128,
        max_model_len=128,
        kvcache_block_size=block_size,
        num_kvcache_blocks=draw(st.integers(min_blocks, min_blocks + 24)),
        enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=chunked,
    )
    return prompts, params, engine


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_batched_equals_alone_and_no_leaks(workload):
    prompts, params, engine = workload
    llm = LLM(backend="mock", **engine)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    eos = set(llm.tokenizer.eos_token_ids)
    for prompt, sp, out in zip(prompts, params, outputs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == mock_generate(prompt, sp, VOCAB, eos)
        assert out.finish_reason in ("stop", "length")
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    for h, holders in bm.hash_to_blocks.items():
        assert holders and all(bm.blocks[block_id].hash == h for block_id in holders)
    assert sum(map(len, bm.hash_to_blocks.values())) == sum(b.hash is not None for b in bm.blocks)
    assert not llm.engine.requests and not llm.engine.has_unfinished()


def test_tiny_cache_forces_preemption_and_stays_exact():
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(40 + 5 * i)] for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True) for _ in prompts]
    llm = LLM(backend="mock", max_num_seqs=6, kvcache_block_size=8, num_kvcache_blocks=16, max_model_len=128)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, sp, out in zip(prompts, params, outputs):
        assert out.token_ids == mock_generate(prompt, sp, VOCAB, set())
    assert llm.engine.block_manager.num_free_blocks == 16


def test_shared_prefix_workload_counts_prefix_hits():
    prefix = list(range(1, 65))
    prompts = [prefix + [100 + i, 200 + i] for i in range(6)]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    cached = LLM(backend="mock", kvcache_block_size=16)
    first = cached.generate(prompts[:1], sp, use_tqdm=False)
    rest = cached.generate(prompts[1:], sp, use_tqdm=False)
    bm = cached.engine.block_manager
    assert first[0].num_cached_tokens == 0
    assert all(out.num_cached_tokens == 64 for out in rest)
    assert bm.prefix_hit_tokens == 5 * 64
    uncached = LLM(backend="mock", kvcache_block_size=16, enable_prefix_caching=False)
    again = uncached.generate(prompts, sp, use_tqdm=False)
    assert uncached.engine.block_manager.prefix_hit_tokens == 0
    assert [o.token_ids for o in again] == [o.token_ids for o in first + rest]

"""The JAX backend through the engine, `LLM(model_dir, backend="jax")`, against transformers."""
from __future__ import annotations

import gc
import os

import jax
import numpy as np
import pytest

from hf_models import load_reference, reference_greedy, reference_logits, tiny_model_dirs
from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.buckets import step_buckets
from nanovllm_jax.jax_runner import tiling_for
from backends.sampler import apply_penalties, log_softmax

NEW_TOKENS = 32
BASE = dict(max_num_seqs=8, max_num_batched_tokens=128)  # a small bucket set keeps warm-up short
SETTINGS = {
    "default": {},
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "preemption": dict(num_kvcache_blocks=14),
    "chunked": dict(max_num_batched_tokens=16),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    return tiny_model_dirs(tmp_path_factory)


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


_engines: dict = {}


@pytest.fixture(scope="module", autouse=True)
def release_engines():
    """Each CPU engine holds thousands of memory mappings (XLA:CPU maps every kernel apart); free
    this module's before later modules build theirs."""
    yield
    _engines.clear()
    gc.collect()


def engine(model_dirs, xla_cache, name: str, setting: str) -> LLM:
    """One LLM per (model, setting), kept until this module's tests end."""
    key = (name, setting)
    if key not in _engines:
        kwargs = BASE | SETTINGS[setting]
        _engines[key] = LLM(str(model_dirs[name]), backend="jax", compilation_cache_dir=xla_cache, **kwargs)
    return _engines[key]


@pytest.fixture(scope="session")
def prompts():
    rng = np.random.default_rng(3)
    shared = rng.integers(2, 1024, size=34).tolist()  # two prompts share two full blocks and more
    out = [rng.integers(2, 1024, size=n).tolist() for n in (3, 9, 17, 25)]
    return out + [shared + [11, 12, 13], shared + [21, 22, 23, 24, 25, 26, 27, 28]]


_greedy_refs: dict = {}


def greedy_reference(model_dirs, name, prompts):
    if name not in _greedy_refs:
        ref = load_reference(model_dirs[name])
        _greedy_refs[name] = [reference_greedy(ref, p, NEW_TOKENS) for p in prompts]
    return _greedy_refs[name]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", ["qwen3", "qwen2", "llama3"])
def test_greedy_tokens_match_transformers(model_dirs, xla_cache, prompts, name, setting):
    llm = engine(model_dirs, xla_cache, name, setting)
    expected = greedy_reference(model_dirs, name, prompts)
    preemptions = llm.engine.scheduler.num_preemptions
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out, exp in zip(prompts, outputs, expected):
        assert out.token_ids == exp, (len(prompt), out.token_ids, exp)
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > preemptions
    if setting == "default":  # the last prompt reuses the shared prefix's cached blocks
        outputs = llm.generate(prompts[-1:], GREEDY, use_tqdm=False)
        assert outputs[0].num_cached_tokens >= 32 and outputs[0].token_ids == expected[-1]


def test_seeded_sampling_is_reproducible_across_batch_compositions(model_dirs, xla_cache, prompts):
    llm = engine(model_dirs, xla_cache, "qwen3", "default")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompts[2]], params, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=s, max_tokens=s, ignore_eos=True) for s in (5, 9, 12)]
    mixed = llm.generate([prompts[0], prompts[2], prompts[4], prompts[1]], [others[0], params, others[1], others[2]],
                         use_tqdm=False)
    assert mixed[1].token_ids == alone
    other_seed = llm.generate([prompts[2]], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                                          max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].token_ids != alone


def test_top_k_one_equals_greedy(model_dirs, xla_cache, prompts):
    llm = engine(model_dirs, xla_cache, "qwen3", "default")
    expected = greedy_reference(model_dirs, "qwen3", prompts)
    params = SamplingParams(temperature=1.0, top_k=1, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outputs] == expected


def test_logprobs_match_reference_log_softmax(model_dirs, xla_cache, prompts):
    llm = engine(model_dirs, xla_cache, "qwen3", "default")
    ref = load_reference(model_dirs["qwen3"])
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=6, logprobs=4, ignore_eos=True)
    out = llm.generate([prompts[3]], params, use_tqdm=False)[0]
    logits = reference_logits(ref, prompts[3] + out.token_ids)
    for step, lp in enumerate(out.logprobs):
        expected = log_softmax(logits[len(prompts[3]) - 1 + step].astype(np.float64))
        assert lp.token_id == out.token_ids[step]
        assert abs(lp.logprob - expected[lp.token_id]) < 1e-4
        top = np.argsort(-expected, kind="stable")[:4]
        assert list(lp.top) == top.tolist()
        np.testing.assert_allclose(list(lp.top.values()), expected[top], atol=1e-4)
        assert sum(np.exp(list(lp.top.values()))) <= 1.0 + 1e-5


def test_penalties_match_reference(model_dirs, xla_cache, prompts):
    """Greedy under repetition / presence / frequency penalties, against transformers logits
    penalized by the numpy reference step by step."""
    llm = engine(model_dirs, xla_cache, "qwen3", "default")
    ref = load_reference(model_dirs["qwen3"])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.8,
                            presence_penalty=0.6, frequency_penalty=0.9)
    prompt = prompts[1] + prompts[1][:4]  # repeats, so the repetition penalty bites on the prompt
    out = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    from nanovllm_jax.runner import SamplingBatch

    sb = SamplingBatch(
        temperature=np.zeros(1, np.float32), top_k=np.zeros(1, np.int32), top_p=np.ones(1, np.float32),
        min_p=np.zeros(1, np.float32), seeds=np.zeros(1, np.uint32), repetition_penalty=np.array([1.8], np.float32),
        presence_penalty=np.array([0.6], np.float32), frequency_penalty=np.array([0.9], np.float32),
        prompt_lens=np.array([len(prompt)], np.int32), banned_token_ids=np.full((1, 1), -1, np.int32), num_logprobs=0,
    )
    context = list(prompt)
    for _ in range(8):
        logits = reference_logits(ref, context)[-1:]
        context.append(int(np.argmax(apply_penalties(logits, sb, [np.array(context)]))))
    assert out == context[len(prompt):]


class CompileCounter:
    """Counts jaxpr traces and XLA compilations reported through jax.monitoring."""

    def __init__(self):
        from jax._src.dispatch import BACKEND_COMPILE_EVENT, JAXPR_TRACE_EVENT

        self.events = (BACKEND_COMPILE_EVENT, JAXPR_TRACE_EVENT)
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event in self.events:
            self.count += 1


def test_no_compilation_after_warmup(model_dirs, xla_cache, prompts):
    """Varied prompt lengths and batch sizes, preemption, prefix hits, every sampling feature."""
    llm = engine(model_dirs, xla_cache, "qwen3", "preemption")
    counter = CompileCounter()
    jax.jit(lambda x: x * 3)(np.arange(5))  # the counter sees a compilation when one happens
    assert counter.count > 0
    counter.count = 0
    rng = np.random.default_rng(11)
    preemptions = llm.engine.scheduler.num_preemptions
    variety = [
        GREEDY,
        SamplingParams(temperature=0.9, top_p=0.8, seed=1, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.1, top_k=7, min_p=0.05, max_tokens=9, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.2, max_tokens=12, min_tokens=3),
        SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=list(range(100, 128)), max_tokens=8),
    ]
    for round_ in range(3):
        batch = [prompts[i] for i in rng.permutation(len(prompts))[: 2 + 2 * round_]]
        batch += [rng.integers(2, 1024, size=int(n)).tolist() for n in rng.integers(1, 60, size=round_ + 1)]
        llm.generate(batch, [variety[i % len(variety)] for i in range(len(batch))], use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > preemptions
    assert counter.count == 0


def test_a_steps_sampler_is_dispatched_when_its_tokens_are_needed(model_dirs, xla_cache, prompts, monkeypatch):
    """Step N's sampler program is dispatched by step N+1's submit (just before its forward) or by the
    read-back of N, never by N's own submit: on GPU its lax.conds hold the dispatching thread until the
    device gets there, so dispatching it behind N's forward would keep the host from overlapping N."""
    from nanovllm_jax import jax_runner

    llm = engine(model_dirs, xla_cache, "qwen3", "default")
    runner, events = llm.engine.runner, []
    programs, result = runner._programs, jax_runner._Pending.result

    def recorded(name, program):
        def call(*args):
            events.append(name)
            return program(*args)
        return call

    def recording_programs(*args):
        layout, forward, sampler = programs(*args)
        return layout, recorded("forward", forward), recorded("sampler", sampler)

    def recording_result(self):
        events.append("result")
        return result(self)

    monkeypatch.setattr(runner, "_programs", recording_programs)
    monkeypatch.setattr(jax_runner._Pending, "result", recording_result)
    out = llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert out[0].token_ids == greedy_reference(model_dirs, "qwen3", prompts)[0][:3]
    assert events == ["forward", "sampler", "forward", "result", "sampler", "forward", "result", "result", "sampler"]


def test_warm_up_runs_every_program_without_touching_the_caches(model_dirs, xla_cache):
    """Warm-up runs each compiled program once (first runs pay one-time costs) on steps whose writes
    are all dropped: the caches are still empty afterwards."""
    llm = LLM(str(model_dirs["llama3"]), backend="jax", compilation_cache_dir=xla_cache, max_num_seqs=4,
              max_num_batched_tokens=16)
    runner = llm.engine.runner
    for cache in (runner.k_cache, runner.v_cache, runner.token_cache):
        assert not np.asarray(cache).any()
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].token_ids == \
        reference_greedy(load_reference(model_dirs["llama3"]), [5, 6, 7], NEW_TOKENS)


def test_a_kv_budget_below_one_block_is_a_clear_error(model_dirs, xla_cache):
    with pytest.raises(ValueError, match="holds no 16-token block"):
        LLM(str(model_dirs["llama3"]), backend="jax", compilation_cache_dir=xla_cache, kv_cache_memory_bytes=1000)


def test_a_kv_cache_past_int32_slots_or_memory_is_a_clear_error(model_dirs, xla_cache):
    for blocks, message in ((2**27, r"exceed 2\*\*31 - 1 slots"), (10**8, r"\(\d+\.\d GiB\) does not fit in memory")):
        with pytest.raises(ValueError, match=message):
            LLM(str(model_dirs["llama3"]), backend="jax", compilation_cache_dir=xla_cache, num_kvcache_blocks=blocks)


def test_an_unwritable_compilation_cache_dir_is_an_os_error_naming_the_setting(tmp_path):
    from nanovllm_jax.jax_runner import enable_compilation_cache

    blocked = tmp_path / "file"
    blocked.write_text("not a dir")
    current = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # as in a fresh process: the first dir set is used
    try:
        with pytest.raises(OSError, match=f"cannot write the cache dir {blocked}/xla .*; set compilation_cache_dir to"):
            enable_compilation_cache(str(blocked / "xla"))
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", current)


def test_an_explicit_kv_budget_wins_on_every_platform():
    from types import SimpleNamespace

    from nanovllm_jax.config import EngineConfig
    from nanovllm_jax.jax_runner import JaxRunner

    gpu_runner = SimpleNamespace(platform="gpu", config=EngineConfig(max_model_len=128, kv_cache_memory_bytes=10_500),
                                 _block_bytes=lambda: 1000)
    assert JaxRunner._blocks_from_budget(gpu_runner) == 10


def test_the_gpu_kv_budget_reserves_logits_only_for_the_rows_a_step_holds(monkeypatch):
    """A step has no more sequences than tokens: a max_num_seqs far above max_num_batched_tokens takes
    no KV memory (10**6 sequences of a 151936-token vocabulary would reserve 2.4 TB of logits)."""
    from types import SimpleNamespace

    from nanovllm_jax.config import EngineConfig
    from nanovllm_jax.jax_runner import TILINGS, JaxRunner

    device = SimpleNamespace(memory_stats=lambda: {"bytes_limit": 80 << 30, "bytes_in_use": 2 << 30})
    monkeypatch.setattr(jax, "devices", lambda: [device])
    model_config = SimpleNamespace(hidden_size=1024, intermediate_size=3072, vocab_size=151936)

    def blocks(max_num_seqs: int) -> int:
        config = EngineConfig(max_model_len=4096, max_num_seqs=max_num_seqs, max_num_batched_tokens=512)
        runner = SimpleNamespace(platform="gpu", config=config, tiling=TILINGS["gpu"], model_config=model_config,
                                 block_size=16, _block_bytes=lambda: 1 << 20)
        return JaxRunner._blocks_from_budget(runner)

    assert 0 < blocks(10**6) == blocks(4096) == blocks(512) < blocks(256)


def test_the_gpu_kv_budget_reserves_activations_for_the_largest_token_bucket(monkeypatch):
    """The largest program runs the budget rounded up to the tiling's token block (or the smallest bucket):
    budgets of 257 and 17 run 512- and 16-token programs, whose activations the budget of 512 / 16 reserves."""
    from types import SimpleNamespace

    from nanovllm_jax.config import EngineConfig
    from nanovllm_jax.jax_runner import TILINGS, JaxRunner

    device = SimpleNamespace(memory_stats=lambda: {"bytes_limit": 80 << 30, "bytes_in_use": 2 << 30})
    monkeypatch.setattr(jax, "devices", lambda: [device])
    model_config = SimpleNamespace(hidden_size=8192, intermediate_size=28672, vocab_size=128256)

    def blocks(budget: int) -> int:
        config = EngineConfig(max_model_len=4096, max_num_seqs=1, max_num_batched_tokens=budget)
        runner = SimpleNamespace(platform="gpu", config=config, tiling=TILINGS["gpu"], model_config=model_config,
                                 block_size=16, _block_bytes=lambda: 1 << 20)
        return JaxRunner._blocks_from_budget(runner)

    assert blocks(257) == blocks(512) < blocks(256)
    assert blocks(1) == blocks(16)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux's memory-mapping limit")
def test_too_few_memory_mappings_left_is_a_clear_error(model_dirs, xla_cache, monkeypatch):
    """Past vm.max_map_count XLA:CPU's JIT fails to allocate and the process crashes: the runner
    refuses to compile instead, and says why."""
    from nanovllm_jax import jax_runner

    with open("/proc/self/maps") as maps:
        used = sum(1 for _ in maps)
    monkeypatch.setattr(jax_runner, "_max_map_count", lambda: used + 100)
    with pytest.raises(RuntimeError, match="vm.max_map_count"):
        LLM(str(model_dirs["llama3"]), backend="jax", compilation_cache_dir=xla_cache, max_num_seqs=4,
            max_num_batched_tokens=16)


@pytest.mark.parametrize("layers", ["unroll", "scan"])
def test_gpu_tiling_and_attention_kernel_match_transformers(model_dirs, xla_cache, prompts, monkeypatch, layers):
    """The GPU's tiling (16-token smallest bucket, the Pallas attention kernel in interpret mode here)
    through the whole engine, with chunked prefill and prefix hits, its layers unrolled (the GPU's
    default) or under lax.scan."""
    from nanovllm_jax import jax_runner

    monkeypatch.setitem(jax_runner.TILINGS, "cpu", jax_runner.TILINGS["gpu"])
    monkeypatch.setenv("NANOVLLM_JAX_LAYERS", layers)
    llm = LLM(str(model_dirs["qwen3"]), backend="jax", compilation_cache_dir=xla_cache, max_num_seqs=8,
              max_num_batched_tokens=32)
    assert llm.engine.runner.buckets == [(16, 8), (32, 8)]
    assert isinstance(llm.engine.runner.params["layers"], list) == (layers == "unroll")
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outputs] == greedy_reference(model_dirs, "qwen3", prompts)
    assert outputs[-1].num_cached_tokens >= 32


def test_step_buckets_start_at_the_platform_smallest():
    assert step_buckets(16, 4) == [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)]
    assert step_buckets(2048, 256, 16) == [(16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (512, 256),
                                           (1024, 256), (2048, 256)]
    assert step_buckets(8, 4, 16) == [(16, 4)]  # a GPU step pads up to 16 tokens whatever the budget


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_a_budget_of_no_power_of_two_keeps_its_tilings_attention_blocks(model_dirs, xla_cache, monkeypatch, platform):
    """A step's attention walks its tokens in blocks of gcd(tokens, token_block): the budget's bucket is
    rounded up, so that a 500-token budget does not walk them 4 at a time (its prefill ran 5x slower)."""
    from nanovllm_jax import jax_runner

    tiling = jax_runner.TILINGS[platform]
    monkeypatch.setitem(jax_runner.TILINGS, "cpu", tiling)
    monkeypatch.setattr(jax_runner.JaxRunner, "_programs", lambda self, tokens, kind: None)  # the layouts only
    monkeypatch.setattr(jax_runner.JaxRunner, "_run_each_program_once", lambda self: None)
    for budget in (17, 100, 500):
        runner = LLM(str(model_dirs["qwen3"]), backend="jax", compilation_cache_dir=xla_cache, max_num_seqs=8,
                     max_num_batched_tokens=budget).engine.runner
        top = runner.buckets[-1][0]
        assert budget <= top < 2 * budget
        largest = runner._layout(top)
        assert largest.token_block >= min(tiling.token_block, runner.buckets[-2][0])  # the bucket before: a power of two


def test_attention_path_choice(monkeypatch):
    assert not tiling_for("cpu").kernel and tiling_for("gpu").kernel
    monkeypatch.setenv("NANOVLLM_JAX_ATTENTION", "xla")
    assert not tiling_for("gpu").kernel
    monkeypatch.setenv("NANOVLLM_JAX_ATTENTION", "pallas")
    assert tiling_for("gpu").kernel
    with pytest.raises(ValueError, match="needs a GPU"):
        tiling_for("cpu")
    monkeypatch.setenv("NANOVLLM_JAX_ATTENTION", "triton")
    with pytest.raises(ValueError, match="'xla' or 'pallas'"):
        tiling_for("gpu")


def test_layer_loop_choice(monkeypatch):
    assert not tiling_for("cpu").scan_layers and not tiling_for("gpu").scan_layers and tiling_for("tpu").scan_layers
    monkeypatch.setenv("NANOVLLM_JAX_LAYERS", "unroll")
    assert not tiling_for("tpu").scan_layers and tiling_for("gpu").kernel
    monkeypatch.setenv("NANOVLLM_JAX_LAYERS", "scan")
    assert tiling_for("cpu").scan_layers
    monkeypatch.setenv("NANOVLLM_JAX_LAYERS", "loop")
    with pytest.raises(ValueError, match="'scan' or 'unroll'"):
        tiling_for("cpu")


def test_a_kernel_that_fails_to_build_names_the_escape_hatch(model_dirs, xla_cache, monkeypatch):
    from nanovllm_jax import jax_runner
    from nanovllm_jax.layers import attention

    def broken(*args, **kwargs):
        raise NotImplementedError("no Triton here")

    monkeypatch.setitem(jax_runner.TILINGS, "cpu", jax_runner.TILINGS["gpu"])
    monkeypatch.setattr(attention, "paged_attention_kernel", broken)
    with pytest.raises(RuntimeError, match="NANOVLLM_JAX_ATTENTION=xla"):
        LLM(str(model_dirs["qwen3"]), backend="jax", compilation_cache_dir=xla_cache, max_num_seqs=8,
            max_num_batched_tokens=32)


def random_request(rng: np.random.Generator, shared: list[int]) -> tuple[list[int], SamplingParams]:
    prompt = shared[: rng.integers(1, len(shared))] if rng.random() < 0.5 else []
    prompt = prompt + rng.integers(2, 1024, size=int(rng.integers(1 - bool(prompt), 40))).tolist()
    features = dict(temperature=float(rng.choice([0.0, 0.6, 1.3])), seed=int(rng.integers(2**31)),
                    max_tokens=int(rng.integers(1, 32)), ignore_eos=True)
    for name, values in (("top_k", [5, 50]), ("top_p", [0.5, 0.9]), ("min_p", [0.05]), ("logprobs", [0, 3]),
                         ("repetition_penalty", [1.3]), ("frequency_penalty", [0.4])):
        if rng.random() < 0.3:
            features[name] = values[rng.integers(len(values))]
    return prompt, SamplingParams(**features)


@pytest.mark.parametrize("setting", ["preemption", "chunked"])
def test_random_arrivals_and_aborts_give_each_request_what_it_gets_alone(model_dirs, xla_cache, prompts, setting):
    """Requests join at random steps of a running engine (async scheduling, preemption or chunked
    prefill, prefix hits) and some are aborted: each finished one equals itself run alone, token for
    token and in its logprobs, an aborted one is a prefix of that, and every block comes back."""
    llm = engine(model_dirs, xla_cache, "qwen3", setting)
    eng, rng = llm.engine, np.random.default_rng(17)
    requests = [random_request(rng, prompts[-1]) for _ in range(16)]
    arrivals = np.sort(rng.integers(0, 24, size=len(requests))).tolist()
    preemptions, index_of, outputs, aborted, step = eng.scheduler.num_preemptions, {}, {}, set(), 0
    while arrivals or eng.has_unfinished():
        while arrivals and arrivals[0] <= step:
            arrivals.pop(0)
            index_of[eng.add_request(*requests[len(index_of)])] = len(index_of)
        running = [rid for rid in index_of if rid not in outputs and rid not in aborted]
        if running and rng.random() < 0.05:
            victim = running[rng.integers(len(running))]
            eng.abort(victim)
            aborted.add(victim)
        for delta in eng.step():
            if delta.finished:
                outputs[delta.request_id] = eng.release(delta.request_id)
        step += 1
        assert step < 2000, "still stepping: a request never finishes"
    assert setting != "preemption" or eng.scheduler.num_preemptions > preemptions
    assert sorted(outputs) == sorted(index_of) and aborted
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    for rid, out in outputs.items():
        prompt, params = requests[index_of[rid]]
        alone = llm.generate([prompt], params, use_tqdm=False)[0]
        if out.finish_reason == "abort":
            assert out.token_ids == alone.token_ids[: len(out.token_ids)]
            continue
        assert (out.token_ids, out.finish_reason) == (alone.token_ids, alone.finish_reason), (prompt, params)
        if params.logprobs is None:
            continue
        assert len(out.logprobs) == len(alone.logprobs) == len(out.token_ids)
        for got, want in zip(out.logprobs, alone.logprobs):
            assert got.token_id == want.token_id and list(got.top) == list(want.top)
            np.testing.assert_allclose([got.logprob, *got.top.values()], [want.logprob, *want.top.values()],
                                       atol=1e-5)

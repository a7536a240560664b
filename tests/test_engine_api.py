"""The public API on the mock backend: stop rules, bad input, streaming, logprobs, abort."""
from __future__ import annotations

import itertools
import json
import shutil
from collections import deque
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backends.mock.runner as mock_runner
from backends.mock import SIMPLE_BPE_PATH
from backends.mock.runner import mock_logits
from backends.sampler import draw, log_softmax
from mock_oracle import mock_generate
from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.sequence import PENDING

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["The scheduler decides which tokens run", "A runner computes them", "héllo wörld 🦊 日本語"]


@pytest.fixture(scope="module")
def llm():
    return LLM(backend="mock", max_model_len=256)


def test_outputs_in_input_order_with_per_prompt_params(llm):
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (9, 2, 5)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [9, 2, 5]
    assert [o.prompt for o in outs] == PROMPTS
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert out.finish_reason == "length"


def test_stop_string_spanning_two_tokens(llm):
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, **GREEDY), use_tqdm=False)[0]
    pieces = [llm.tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    # a stop string made of the last char of token 5's text and the first of token 6's
    k = next(i for i in range(4, 30) if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    cut = free.text.find(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, stop=["zzzzzz", stop], **GREEDY), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert llm.tokenizer.decode(out.token_ids).find(stop) >= 0  # the tokens that made the stop string stay


def test_stop_token_ids_and_min_tokens(llm):
    free = llm.generate(PROMPTS[1], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0]
    stop_id = free.token_ids[3]
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=30, stop_token_ids=[stop_id], **GREEDY), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    held = SamplingParams(max_tokens=30, min_tokens=10, stop_token_ids=[stop_id], **GREEDY)
    out = llm.generate(PROMPTS[1], held, use_tqdm=False)[0]
    assert stop_id not in out.token_ids[:10]  # banned while below min_tokens
    assert len(out.token_ids) >= 10
    prompt_ids = llm.tokenizer.encode(PROMPTS[1])
    assert out.token_ids == mock_generate(prompt_ids, held, 1024, set())


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, llm):
    """A model dir whose config names, as EOS, a token the mock emits greedily for PROMPTS[2]."""
    free = llm.generate(PROMPTS[2], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0]
    eos = free.token_ids[4]
    model_dir = tmp_path_factory.mktemp("eos_model")
    shutil.copy(SIMPLE_BPE_PATH, model_dir / "tokenizer.json")
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    return model_dir, eos, free


def test_eos_stops_unless_ignored(eos_model):
    model_dir, eos, free = eos_model
    llm = LLM(str(model_dir), backend="mock", max_model_len=256)
    assert llm.tokenizer.eos_token_ids == [eos]
    stopped = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    ignored = llm.generate(PROMPTS[2], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_min_tokens_bans_eos_even_with_ignore_eos(eos_model):
    """As in vLLM (its min-tokens processor masks every EOS id, ignore_eos or not): the first min_tokens
    tokens are never EOS. Before, ignore_eos left EOS drawable there (the greedy 5th token here)."""
    model_dir, eos, free = eos_model
    llm = LLM(str(model_dir), backend="mock", max_model_len=256)
    assert free.token_ids[4] == eos
    params = SamplingParams(max_tokens=12, min_tokens=6, **GREEDY)
    out = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert eos not in out.token_ids[:6] and out.token_ids[:4] == free.token_ids[:4]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.token_ids == mock_generate(llm.tokenizer.encode(PROMPTS[2]), params, 1024, {eos})


def test_max_tokens_and_seeded_sampling(llm):
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0]
    batched = llm.generate(PROMPTS + [PROMPTS[0]], [SamplingParams(max_tokens=3)] * 3 + [sp], use_tqdm=False)[3]
    assert alone.token_ids == batched.token_ids and len(alone.token_ids) == 12


def test_logprobs_are_log_softmax_of_the_model_logits(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, logprobs=3, **GREEDY), use_tqdm=False)[0]
    context = [5, 6, 7]
    for token, lp in zip(out.token_ids, out.logprobs):
        ref = log_softmax(mock_logits(np.array(context, np.int32), 1024)[None])[0]
        assert lp.token_id == token and lp.logprob == pytest.approx(ref[token], abs=1e-5)
        assert list(lp.top) == list(np.argsort(-ref)[:3])
        assert all(v == pytest.approx(ref[k], abs=1e-5) for k, v in lp.top.items())
        context.append(token)
    zero = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, logprobs=0, **GREEDY), use_tqdm=False)[0]
    assert all(lp.top == {} for lp in zero.logprobs)


def test_logprobs_carry_the_sampled_tokens_rank(llm):
    """As vLLM's: how many raw logprobs are >= the sampled token's; 1 for an untied greedy token."""
    for params, ranks in ((SamplingParams(max_tokens=6, logprobs=2, temperature=5.0, seed=3, ignore_eos=True), set()),
                          (SamplingParams(max_tokens=3, logprobs=0, **GREEDY), {1})):
        out = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
        context = [5, 6, 7]
        for token, lp in zip(out.token_ids, out.logprobs):
            ref = log_softmax(mock_logits(np.array(context, np.int32), 1024)[None])[0]
            assert lp.rank == (ref >= ref[token]).sum()
            context.append(token)
        got = {lp.rank for lp in out.logprobs}
        assert got == ranks if ranks else max(got) > 1


def test_a_runner_that_reports_no_ranks_gives_rank_0(monkeypatch):
    """StepOutput.ranks is optional (a runner written before ranks existed): the step read it regardless."""
    import dataclasses

    llm = LLM(backend="mock")
    execute = llm.engine.runner.execute
    monkeypatch.setattr(llm.engine.runner, "execute", lambda batch: dataclasses.replace(execute(batch), ranks=None))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, logprobs=1, **GREEDY), use_tqdm=False)[0]
    assert [lp.rank for lp in out.logprobs] == [0, 0, 0] and len(out.token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1e39), "temperature"),  # inf as float32
        (dict(top_k=-2), "top_k"),
        (dict(top_k=np.float64(3.0)), "top_k"),
        (dict(max_tokens=None, min_tokens=-1), "min_tokens"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=-0.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(seed=-1), "seed"),
        (dict(logprobs=50), "logprobs"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(temperature=10**400), "temperature"),
        (dict(top_p=Fraction(10**400, 3)), "top_p"),
        (dict(stop=np.array("a")), "stop"),
        (dict(stop_token_ids=np.array([[1]])), "stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_take_numpy_scalars_and_vllm_defaults():
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.5), top_k=np.int64(0),
                            seed=np.uint32(3), max_tokens=np.int64(7), stop_token_ids=np.array([5]),
                            ignore_eos=np.bool_(True))
    values = (params.temperature, params.top_p, params.top_k, params.seed, params.max_tokens,
              params.stop_token_ids[0], params.ignore_eos)
    assert values == (0.5, 0.5, -1, 3, 7, 5, True)
    assert [type(v) for v in values] == [float, float, int, int, int, int, bool]


def test_max_tokens_none_runs_to_max_model_len(llm):
    out = llm.generate([[5] * 250], SamplingParams(max_tokens=None, **GREEDY), use_tqdm=False)[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="leaves no room"):
        llm.generate([[5] * 256], SamplingParams(max_tokens=None), use_tqdm=False)
    with pytest.raises(ValueError, match=r"leaves no room for min_tokens \(10\)"):
        llm.generate([[5] * 250], SamplingParams(max_tokens=None, min_tokens=10), use_tqdm=False)
    small = LLM(backend="mock", max_model_len=256, num_kvcache_blocks=4)
    with pytest.raises(ValueError, match=r"max_tokens=None: up to max_model_len"):
        small.generate([[5] * 10], SamplingParams(max_tokens=None), use_tqdm=False)


def test_stop_strings_wait_for_min_tokens(llm):
    """As in vLLM, a stop string must end in the text of a token past the first min_tokens. Greedy
    PROMPTS[0] starts 'ts', 'I', ...: with min_tokens=1, 'ts' (the first token's text) once ended the
    request at that token, empty, and a shorter stop string in the lookback of a longer one still
    matched the held-back text one token later."""
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0]
    assert llm.tokenizer.decode(free.token_ids[:1]) == "ts" and free.text.count("ts") == 1
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, stop=["ts"], **GREEDY), use_tqdm=False)[0]
    assert (out.text, out.token_ids, out.finish_reason) == ("", free.token_ids[:1], "stop")
    for stop in (["ts"], ["ts", "longer stop"]):
        held = SamplingParams(max_tokens=8, min_tokens=1, stop=stop, **GREEDY)
        out = llm.generate(PROMPTS[0], held, use_tqdm=False)[0]
        assert (out.text, out.token_ids, out.finish_reason) == (free.text, free.token_ids, "length"), stop
    second = llm.tokenizer.decode(free.token_ids[1:2])  # a stop string ending in the second token's text
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, min_tokens=1, stop=["s" + second], **GREEDY),
                       use_tqdm=False)[0]
    assert (out.text, out.token_ids, out.finish_reason) == ("t", free.token_ids[:2], "stop")


def test_min_tokens_masks_at_most_max_banned_ids(llm):
    from nanovllm_jax.runner import MAX_BANNED_IDS

    ids = list(range(100, 100 + MAX_BANNED_IDS - 1))  # and the EOS id, banned even with ignore_eos
    out = llm.generate(PROMPTS[0], SamplingParams(min_tokens=3, max_tokens=5, stop_token_ids=ids, **GREEDY),
                       use_tqdm=False)[0]
    assert len(out.token_ids) >= 3 and not set(out.token_ids[:3]) & set(ids)
    with pytest.raises(ValueError, match=f"may number at most {MAX_BANNED_IDS}"):
        llm.generate(PROMPTS[0], SamplingParams(min_tokens=3, stop_token_ids=ids + [99], **GREEDY), use_tqdm=False)
    assert llm.generate(PROMPTS[0], SamplingParams(stop_token_ids=ids + [99], max_tokens=2), use_tqdm=False)


def test_a_temperature_below_sampling_eps_is_greedy(llm):
    """As in vLLM; logits / 1e-44 overflow float32, which once drew the out-of-vocabulary id 1024."""
    greedy = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0]
    for temperature in (1e-6, 1e-30, 1e-44, 5e-324):
        params = SamplingParams(temperature=temperature, seed=3, max_tokens=6, ignore_eos=True, min_tokens=2)
        assert llm.generate(PROMPTS[0], params, use_tqdm=False)[0].token_ids == greedy.token_ids


def test_the_numpy_draw_never_leaves_the_vocabulary():
    with np.errstate(invalid="ignore"):
        for logits in ([-np.inf] * 8, [1.0, np.nan, 2.0], [0.0, np.inf, 1.0]):
            for u in (0.0, 0.5, 0.999):
                assert 0 <= draw(np.array(logits, np.float32), u) < len(logits)


def test_a_top_k_past_the_vocabulary_keeps_every_token(llm):
    """top_k >= the vocabulary is no limit (as in vLLM); 2**31 once overflowed the int32 batch in every step."""
    base = dict(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    unlimited = llm.generate(PROMPTS[0], SamplingParams(top_k=-1, **base), use_tqdm=False)[0]
    beside = SamplingParams(max_tokens=3, **GREEDY)
    for top_k in (1024, 2**31, 2**70):
        outs = llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(top_k=top_k, **base), beside], use_tqdm=False)
        assert outs[0].token_ids == unlimited.token_ids and len(outs[1].token_ids) == 3


def test_bad_requests_raise_and_the_engine_keeps_serving(llm):
    ok = SamplingParams(max_tokens=4, **GREEDY)
    expected = llm.generate(PROMPTS[0], ok, use_tqdm=False)[0].token_ids
    cases = [
        ("", ok, "empty"),
        ([], ok, "empty"),
        ([1] * 300, ok, "max_model_len"),
        ([1] * 200, SamplingParams(max_tokens=100), "max_model_len"),
        ([5000], ok, r"\[0, 1024\)"),
        (PROMPTS[0], SamplingParams(stop_token_ids=[99999]), "stop_token_ids"),
        (3.5, ok, "string or a list"),
        ([5.9, 6.2], ok, "integers"),
        ([True, False], ok, "integers"),
        ({"prompt_token_ids": [5], "extra": 1}, ok, "dict prompt"),
        ("caf\ud800", ok, "not valid Unicode"),  # a lone surrogate, as undecodable command-line bytes become
        (np.array(5), ok, "one-dimensional"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[0], prompt], params, use_tqdm=False)
        assert not llm.engine.has_unfinished()  # nothing of the failed call was queued
    assert llm.generate(PROMPTS[0], ok, use_tqdm=False)[0].token_ids == expected
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(PROMPTS, [ok, ok], use_tqdm=False)
    for params in (5, {"temperature": 1.0}, SamplingParams):
        with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
            llm.generate(PROMPTS[0], params, use_tqdm=False)
    for params in (deque([ok, ok]), (ok, ok), (p for p in (ok, ok))):  # any sequence or iterable of them
        assert [o.token_ids for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)][0] == expected
    with pytest.raises(ValueError, match="got 2 prompts and 1 sampling params"):
        llm.engine.add_requests(PROMPTS[:2], [ok])
    with pytest.raises(ValueError, match="one-dimensional"):
        llm.generate(np.array(5), ok, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_bad_engine_arguments():
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        LLM(backend="torch")
    with pytest.raises(ValueError, match="does_not_exist"):
        LLM("/nonexistent/does_not_exist", backend="jax")
    with pytest.raises(ValueError, match="kvcache_block_size"):
        LLM(backend="mock", kvcache_block_size=24)
    with pytest.raises(ValueError, match="kvcache_block_size"):
        LLM(backend="mock", kvcache_block_size=4)
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(backend="mock", max_num_seq=4)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(backend="mock", enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)
    with pytest.raises(ValueError, match="KV blocks"):
        LLM(backend="mock", num_kvcache_blocks=2, kvcache_block_size=8).generate([[1] * 20], use_tqdm=False)
    one_block = LLM(backend="mock", num_kvcache_blocks=1, kvcache_block_size=8)  # the last token needs no slot
    assert len(one_block.generate([[1] * 5], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].token_ids) == 4
    with pytest.raises(ValueError, match="needs 2 KV blocks"):
        one_block.generate([[1] * 5], SamplingParams(max_tokens=5), use_tqdm=False)
    for size in (8, 64, 256):  # any power of two from 8 up
        assert LLM(backend="mock", kvcache_block_size=size).generate([[1, 2]], use_tqdm=False)[0].token_ids
    with pytest.raises(ValueError, match="model must be None, a model dir or a .gguf path"):
        LLM(123, backend="mock")
    for blocks in (2**27, 10**20):  # slots are int32 (the mock's cache then fits in memory)
        with pytest.raises(ValueError, match=r"exceed 2\*\*31 - 1 slots"):
            LLM(backend="mock", num_kvcache_blocks=blocks)
    assert LLM(backend="mock", max_num_seqs=10**6).engine.runner.num_kvcache_blocks == 1 << 20  # not 128M blocks
    with pytest.raises(ValueError, match=r"max_model_len=1099511627776 exceeds the model's limit of 1048576"):
        LLM(backend="mock", max_model_len=2**40)  # was taken, then each step's block tables took 256 GiB
    assert LLM(backend="mock").config.max_model_len == 2048


def test_without_chunked_prefill_the_default_token_budget_takes_a_whole_prompt():
    """As in vLLM: the budget's default (512) was below max_model_len, so enable_chunked_prefill=False alone
    refused to start on any model longer than 512 tokens."""
    llm = LLM(backend="mock", enable_chunked_prefill=False, max_model_len=2048)
    assert llm.config.max_num_batched_tokens == 2048
    assert len(llm.generate([[1] * 1500], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].token_ids) == 4
    assert LLM(backend="mock", max_model_len=2048).config.max_num_batched_tokens == 512


def test_a_token_budget_past_what_any_step_holds_is_cut_to_it():
    llm = LLM(backend="mock", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=10**7)
    assert llm.config.max_num_batched_tokens == 128
    assert len(llm.generate([[1] * 60] * 3, SamplingParams(max_tokens=4), use_tqdm=False)) == 3


def test_prompt_containers_as_in_vllm(llm):
    """vLLM's dict prompts; a 1-D integer array or a tuple is one prompt of token ids; ids must be integers."""
    params = SamplingParams(max_tokens=3, **GREEDY)
    ids = [5, 6, 7]
    expected = llm.generate([ids], params, use_tqdm=False)[0].token_ids
    for prompts in ({"prompt_token_ids": ids}, [{"prompt_token_ids": tuple(ids)}], np.array(ids), tuple(ids),
                    list(np.array(ids)), [np.array(ids, np.int32)], np.array([ids])):
        (out,) = llm.generate(prompts, params, use_tqdm=False)
        assert out.prompt is None and out.prompt_token_ids == ids and out.token_ids == expected
    text = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    for prompts in ({"prompt": PROMPTS[0]}, [{"prompt": PROMPTS[0]}, PROMPTS[1]]):
        out = llm.generate(prompts, params, use_tqdm=False)[0]
        assert out.prompt == PROMPTS[0] and out.token_ids == text.token_ids
    for bad, message in (([[5.9, 6.2]], "integers"), (np.array([5.0, 6.0]), "integers"),
                         ({"prompt": ids}, "dict prompt"), ({"text": "hi"}, "dict prompt"),
                         ([{"prompt_token_ids": "hi"}], "dict prompt")):
        with pytest.raises(ValueError, match=message):
            llm.generate(bad, params, use_tqdm=False)
    assert not llm.engine.requests


def test_a_stop_string_completed_by_the_final_flush_stops(monkeypatch):
    """The detokenizer holds back an incomplete character until the end; the text that flush releases
    is searched for stop strings too."""
    llm = LLM(backend="mock", max_model_len=256)
    tok = llm.tokenizer
    # " x", then a space and the first bytes of a multi-byte character (decoded at the end as U+FFFD)
    script = tok.encode(" x") + [next(i for i in range(tok.vocab_size) if tok.decode([i]) == " \ufffd")]
    prompt = [5, 6, 7]

    def scripted_logits(context, vocab_size):
        logits = np.zeros(vocab_size, np.float32)
        logits[script[min(len(context) - len(prompt), len(script) - 1)]] = 10.0
        return logits

    monkeypatch.setattr(mock_runner, "mock_logits", scripted_logits)
    params = SamplingParams(max_tokens=len(script), **GREEDY)
    free = llm.generate([prompt], params, use_tqdm=False)[0]
    assert free.token_ids == script and free.text == " x \ufffd" and free.finish_reason == "length"
    stopped = SamplingParams(max_tokens=len(script), stop=["x "], **GREEDY)
    out = llm.generate([prompt], stopped, use_tqdm=False)[0]
    assert out.text == " " and out.finish_reason == "stop" and out.token_ids == script
    deltas = list(llm.stream([prompt], stopped))
    assert "".join(d.text for d in deltas) == " " and deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("kwargs", [dict(gpu_memory_utilization="0.9"), dict(gpu_memory_utilization=None),
                                    dict(gpu_memory_utilization=True), dict(enable_prefix_caching="no"),
                                    dict(enable_chunked_prefill=0.5), dict(compilation_cache_dir=123)])
def test_engine_arguments_of_the_wrong_type_name_the_field(kwargs):
    (field,) = kwargs
    with pytest.raises(ValueError, match=field):
        LLM(backend="mock", **kwargs)


def test_stream_matches_generate_including_multibyte_text(llm):
    params = [SamplingParams(max_tokens=n, seed=s, temperature=1.0) for n, s in ((25, 1), (18, 2), (30, 3))]
    params[1] = SamplingParams(max_tokens=18, seed=2, stop=["e "], temperature=1.0)
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    texts, tokens, reasons = ["", "", ""], [[], [], []], [None, None, None]
    for delta in llm.stream(PROMPTS, params):
        texts[delta.index] += delta.text
        tokens[delta.index] += delta.token_ids
        if delta.finished:
            reasons[delta.index] = delta.finish_reason
    assert texts == [o.text for o in final]
    assert tokens == [o.token_ids for o in final]
    assert reasons == [o.finish_reason for o in final]


def test_stream_deltas_carry_the_logprobs_of_their_tokens(llm):
    """As vLLM's delta outputs: a stream's only way to its logprobs (it releases each finished request)."""
    params = [SamplingParams(max_tokens=9, seed=1, logprobs=2, stop=["e "]),
              SamplingParams(max_tokens=7, seed=2, logprobs=0), SamplingParams(max_tokens=5, seed=3)]
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    logprobs = [[], [], None]
    for delta in llm.stream(PROMPTS, params):
        if delta.index == 2:
            assert delta.logprobs is None
        else:
            assert [lp.token_id for lp in delta.logprobs] == delta.token_ids
            logprobs[delta.index] += delta.logprobs
    assert logprobs == [o.logprobs for o in final]


@settings(max_examples=80, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_incremental_detokenizer_never_splits_a_character(llm, text):
    from nanovllm_jax.detokenizer import IncrementalDetokenizer

    ids = llm.tokenizer.encode(text)
    detok = IncrementalDetokenizer(llm.tokenizer, [])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_detokenizer_leaves_textless_tokens_out_of_its_window(llm):
    """Ids past the vocabulary (a random-weight model samples them) add no text in any context, as
    skipped special tokens: they stay out of the window, so a run of them keeps each decode short
    (and the window's prefix is decoded once, not per token), and the text around them is what
    decoding everything at once gives."""
    from nanovllm_jax.detokenizer import IncrementalDetokenizer

    tok = llm.tokenizer
    words = tok.encode(" one two three")
    detok = IncrementalDetokenizer(tok, tok.encode("Count:"))
    text = "".join(detok.add(t) for t in words[:1])
    decoded = []
    detok.tokenizer = SimpleNamespace(decode=lambda ids: decoded.append(ids) or tok.decode(ids))
    text += "".join(detok.add(tok.vocab_size + 7) for _ in range(500))
    detok.tokenizer = tok
    assert len(decoded) <= 2 * 500 + 1 and max(map(len, decoded)) < 10
    text += "".join(detok.add(t) for t in words[1:]) + detok.flush()
    assert text == tok.decode(words) == " one two three"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_simple_bpe_round_trips_any_unicode(llm, text):
    assert llm.tokenizer.decode(llm.tokenizer.encode(text)) == text


def test_abort_frees_blocks(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=50, **GREEDY)
    rid = engine.add_request(PROMPTS[0], params)
    engine.step()
    engine.step()  # the first token is read back; the second is in flight
    engine.abort(rid)
    out = engine.release(rid)
    assert out.finish_reason == "abort"
    assert out.token_ids == mock_generate(out.prompt_token_ids, params, llm.engine.runner.vocab_size, set())[:1]
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    again = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0]
    assert again.token_ids == mock_generate(out.prompt_token_ids, params, llm.engine.runner.vocab_size, set())[:3]


def test_release_refuses_unknown_and_running_requests(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="no request 123456"):
        engine.release(123456)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(ValueError, match="still running"):
        engine.release(rid)
    engine.abort(rid)
    (delta,) = engine.step()  # the next step reports the abort
    assert delta.request_id == rid and delta.finished and delta.finish_reason == "abort"
    assert engine.release(rid).finish_reason == "abort"
    with pytest.raises(ValueError, match=f"no request {rid}"):
        engine.release(rid)


def step_limit(monkeypatch, llm, limit=500):
    """Fail, rather than hang, a call that steps the engine forever."""
    step, steps = llm.engine.step, []

    def limited():
        steps.append(1)
        assert len(steps) <= limit, f"still stepping after {limit} engine steps"
        return step()

    monkeypatch.setattr(llm.engine, "step", limited)


def test_abort_ends_the_waiting_stream_or_generate_with_finish_reason_abort(monkeypatch):
    llm = LLM(backend="mock", max_model_len=256)
    step_limit(monkeypatch, llm)
    params = SamplingParams(max_tokens=20, **GREEDY)
    full = llm.generate(["abort me", "keep me"], params, use_tqdm=False)
    tokens, reasons = [[], []], [None, None]
    for delta in llm.stream(["abort me", "keep me"], params):
        tokens[delta.index] += delta.token_ids
        if delta.finished:
            reasons[delta.index] = delta.finish_reason
        if delta.index == 0 and len(tokens[0]) == 2 and not delta.finished:
            llm.engine.abort(delta.request_id)  # e.g. a client disconnected
    assert reasons == ["abort", "length"]
    assert tokens == [full[0].token_ids[:2], full[1].token_ids]

    step, steps = llm.engine.step, []

    def aborting_step():  # aborts the first request from inside generate()'s fourth step
        deltas = step()
        steps.append(deltas)
        if len(steps) == 4:
            llm.engine.abort(min(d.request_id for d in deltas))
        return deltas

    monkeypatch.setattr(llm.engine, "step", aborting_step)
    outs = llm.generate(["abort me", "keep me"], params, use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["abort", "length"] and outs[1].token_ids == full[1].token_ids
    assert outs[0].token_ids == full[0].token_ids[: len(outs[0].token_ids)] and len(outs[0].token_ids) < 20
    assert not llm.engine.requests


def test_open_streams_and_generate_each_get_exactly_their_own_tokens(monkeypatch):
    """A stream is consumed lazily, so other calls may step the engine meanwhile: each call still gets
    all of its own requests' deltas and none of another's."""
    llm = LLM(backend="mock", max_model_len=256)
    step_limit(monkeypatch, llm)
    params = SamplingParams(max_tokens=20, **GREEDY)
    prompts = ["a stream", "short", "stream B"]
    alone = {p: llm.generate(p, params, use_tqdm=False)[0] for p in prompts}

    def joined(deltas):
        deltas = list(deltas)
        assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finish_reason == "length"
        return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas)

    expected = {p: (alone[p].token_ids, alone[p].text) for p in prompts}
    # generate() while a stream is open, then the rest of the stream
    stream = llm.stream(["a stream"], params)
    first = next(stream)
    assert [(o.token_ids, o.text) for o in llm.generate(["short"], params, use_tqdm=False)] == [expected["short"]]
    assert joined([first, *stream]) == expected["a stream"]
    # generate() outliving a stream it stepped to the end
    stream = llm.stream(["short"], params)
    first = next(stream)
    assert [(o.token_ids, o.text) for o in llm.generate(["stream B"], params, use_tqdm=False)] == [expected["stream B"]]
    assert joined([first, *stream]) == expected["short"]
    # two streams taking turns
    a, b = llm.stream(["a stream"], params), llm.stream(["stream B"], params)
    got_a, got_b = [], []
    for da, db in zip(a, b):
        got_a.append(da)
        got_b.append(db)
    assert joined(got_a + list(a)) == expected["a stream"] and joined(got_b + list(b)) == expected["stream B"]
    assert not llm.engine.requests and not llm._backlog and not llm._open


def test_next_step_is_submitted_before_the_last_is_read_back(monkeypatch):
    """The host schedules step N+1 while step N runs: N+1 is submitted before N's tokens are read back,
    and its decode rows name the rows of N whose tokens are their inputs."""
    llm = LLM(backend="mock", max_model_len=256)
    runner, events = llm.engine.runner, []
    submit = runner.submit

    class Recorded:
        def __init__(self, step, done):
            self.step, self.done = step, done

        def result(self):
            events.append(("result", self.step))
            return self.done.result()

    def recording_submit(batch):
        step = sum(e[0] == "submit" for e in events)
        events.append(("submit", step, batch.prev_rows.tolist(), batch.input_ids.tolist()))
        return Recorded(step, submit(batch))

    monkeypatch.setattr(runner, "submit", recording_submit)
    prompts, params = [[5, 6, 7], [8, 9]], SamplingParams(max_tokens=4, **GREEDY)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [e[:2] for e in events] == [("submit", 0), ("submit", 1), ("result", 0), ("submit", 2), ("result", 1),
                                       ("submit", 3), ("result", 2), ("result", 3)]  # 4 tokens: 4 steps
    assert events[1][2:] == ([0, 1], [PENDING, PENDING])
    assert [o.token_ids for o in outs] == [mock_generate(p, params, runner.vocab_size, set()) for p in prompts]


def test_no_step_is_left_in_flight_once_every_request_stopped(monkeypatch):
    """A stop token read back from step N ends the request after N+1 was submitted for it: the engine
    waits for N+1 before it reports the work done, so no step outlives it."""
    llm = LLM(backend="mock", max_model_len=256)
    runner, events = llm.engine.runner, []
    submit = runner.submit

    class Recorded:
        def __init__(self, done):
            self.done = done

        def result(self):
            events.append("result")
            return self.done.result()

    def recording_submit(batch):
        events.append("submit")
        return Recorded(submit(batch))

    monkeypatch.setattr(runner, "submit", recording_submit)
    prompt = [5, 6, 7]
    expected = mock_generate(prompt, SamplingParams(max_tokens=8, **GREEDY), runner.vocab_size, set())
    params = SamplingParams(max_tokens=8, stop_token_ids=[expected[1]], **GREEDY)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.token_ids == expected[:2] and out.finish_reason == "stop"
    assert events == ["submit", "submit", "result", "submit", "result", "result"]
    assert llm.engine._in_flight is None


def test_a_failed_step_fails_its_requests_only(monkeypatch):
    """A backend error while reading a step back reaches the caller; its requests are aborted and
    the engine serves the next ones exactly."""
    llm = LLM(backend="mock", max_model_len=256)
    runner = llm.engine.runner
    fail_submits(monkeypatch, runner, {3})
    params = SamplingParams(max_tokens=8, **GREEDY)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
    assert not llm.engine.requests and not llm.engine.has_unfinished()
    outs = llm.generate([[10, 11, 12], [13]], params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [mock_generate(p, params, runner.vocab_size, set()) for p in ([10, 11, 12], [13])]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def fail_submits(monkeypatch, runner, fail_at) -> list:
    """The runner's steps numbered in `fail_at` (from 1; the caller may add to it later) raise "device
    lost" when read back; returns the list of submitted batches."""
    submit, submitted = runner.submit, []

    class Failing:
        def result(self):
            raise RuntimeError("device lost")

    def failing(batch):
        submitted.append(batch)
        done = submit(batch)
        return Failing() if len(submitted) in fail_at else done

    monkeypatch.setattr(runner, "submit", failing)
    return submitted


def limit_steps(monkeypatch, engine, limit: int = 200) -> None:
    """A call that would wait forever fails instead."""
    step, count = engine.step, itertools.count()

    def limited():
        assert next(count) < limit, "still stepping: a request never finishes"
        return step()

    monkeypatch.setattr(engine, "step", limited)


def test_a_failed_step_ends_another_calls_requests_with_abort(monkeypatch):
    """A step read back by one call fails: a request of another open stream in that step lost its
    token, so it ends "abort" with the tokens it had (before, it went on a token short and then
    never finished); the engine stepped on directly reports it too."""
    llm = LLM(backend="mock", max_model_len=256)
    runner, fail_at = llm.engine.runner, set()
    submitted = fail_submits(monkeypatch, runner, fail_at)
    limit_steps(monkeypatch, llm.engine)
    params = SamplingParams(max_tokens=12, **GREEDY)
    expected = mock_generate([20, 21, 22], params, runner.vocab_size, set())
    stream = llm.stream([[20, 21, 22]], params)
    got = list(next(stream).token_ids)
    fail_at.add(len(submitted) + 2)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    rest = list(stream)
    got += [t for delta in rest for t in delta.token_ids]
    assert rest[-1].finish_reason == "abort" and got == expected[: len(got)] and len(got) < len(expected)

    engine = llm.engine
    rid = engine.add_request([20, 21, 22], params)
    fail_at.add(len(submitted) + 3)
    reported = []
    while engine.has_unfinished():
        try:
            reported += engine.step()
        except RuntimeError:
            pass
    assert reported[-1].finish_reason == "abort"
    assert engine.release(rid).token_ids == [t for d in reported for t in d.token_ids] == expected[:2]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_read_back_failing_midway_still_delivers_the_rows_read_before_it(monkeypatch):
    """Detokenizing one row raises after another row of the step was read: that row's delta (with an
    open stream's token in it) comes with the next step instead of being lost."""
    llm = LLM(backend="mock", max_model_len=256)
    engine, params = llm.engine, SamplingParams(max_tokens=3, **GREEDY)
    append, armed = engine._append_token, []

    def failing_for_the_second_request(request, token, row, output):
        delta = append(request, token, row, output)
        if armed and request.seq.seq_id == 1:
            armed.clear()
            raise RuntimeError("detokenizer failed")
        return delta

    monkeypatch.setattr(engine, "_append_token", failing_for_the_second_request)
    limit_steps(monkeypatch, engine)
    stream = llm.stream([[20, 21, 22]], params)
    got = list(next(stream).token_ids)
    armed.append(True)
    with pytest.raises(RuntimeError, match="detokenizer failed"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    rest = list(stream)
    assert got + [t for d in rest for t in d.token_ids] == mock_generate([20, 21, 22], params, 1024, set())
    assert rest[-1].finish_reason == "length" and not engine.has_unfinished()


def test_a_failing_decode_aborts_the_step_and_the_engine_serves_on(monkeypatch):
    llm = LLM(backend="mock", max_model_len=256)
    engine, params = llm.engine, SamplingParams(max_tokens=6, **GREEDY)
    decode, armed = llm.tokenizer.decode, []

    def failing_once(token_ids, *args):
        if armed:
            armed.clear()
            raise RuntimeError("tokenizer failed")
        return decode(token_ids, *args)

    monkeypatch.setattr(llm.tokenizer, "decode", failing_once)
    limit_steps(monkeypatch, engine)
    stream = llm.stream([[20, 21, 22]], params)
    got = list(next(stream).token_ids)
    armed.append(True)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    rest = list(stream)
    expected = mock_generate([20, 21, 22], params, 1024, set())
    tokens = got + [t for d in rest for t in d.token_ids]
    assert rest[-1].finish_reason == "abort" and tokens == expected[: len(tokens)]
    assert llm.generate([[20, 21, 22]], params, use_tqdm=False)[0].token_ids == expected
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_releasing_a_request_a_stream_waits_on_ends_the_stream_with_an_error(llm, monkeypatch):
    limit_steps(monkeypatch, llm.engine)
    stream = llm.stream([[5, 6, 7]], SamplingParams(max_tokens=50, **GREEDY))
    request_id = next(stream).request_id
    llm.engine.abort(request_id)
    llm.engine.release(request_id)
    with pytest.raises(RuntimeError, match=r"requests \[\d+\] were released"):
        list(stream)


def test_reset_prefix_cache_forgets_cached_prompts_only_when_idle(llm):
    prompt = list(range(3, 70))  # four full blocks of 16
    params = SamplingParams(max_tokens=2, **GREEDY)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 64
    rid = llm.engine.add_request(prompt, params)
    llm.engine.step()
    assert not llm.reset_prefix_cache()  # a request holds blocks: nothing changes
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm.engine.release(rid)
    assert llm.reset_prefix_cache()
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids


def test_chat_applies_the_model_chat_template(tmp_path):
    shutil.copy(SIMPLE_BPE_PATH, tmp_path / "tokenizer.json")
    template = (  # eos_token closes assistant turns, as Llama 2 / Mistral templates do
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    (tmp_path / "config.json").write_text("{}")
    llm = LLM(str(tmp_path), backend="mock")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "more"}]
    (out,) = llm.chat(conversation, SamplingParams(max_tokens=3), use_tqdm=False)
    assert out.prompt_token_ids == llm.tokenizer.encode("<user>hi\n<assistant>yo</s>\n<user>more\n<assistant>")
    with pytest.raises(ValueError, match="no chat template"):
        LLM(backend="mock").chat(conversation)
    named = [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named, "eos_token": "</s>"}))
    assert LLM(str(tmp_path), backend="mock").chat_prompt(conversation) == out.prompt_token_ids


def test_a_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    """As in transformers (and so vLLM): chat_template.jinja overrides tokenizer_config.json's chat_template."""
    stale = "{% for m in messages %}old:{{ m['content'] }}{% endfor %}"
    for config_template in (stale, [{"name": "default", "template": stale}]):
        chat_model_dir(tmp_path, config_template)
        (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}new:{{ m['content'] }}{% endfor %}")
        llm = LLM(str(tmp_path), backend="mock")
        assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "new:hi"


def test_special_tokens_only_in_special_tokens_map_json_are_read(tmp_path):
    """Older saves name bos/eos only in special_tokens_map.json; transformers' eos_token (vLLM's EOS) comes from it."""
    chat_model_dir(tmp_path, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                                  "eos_token": {"content": "<|endoftext|>"}}))
    tok = LLM(str(tmp_path), backend="mock").tokenizer
    assert tok.eos_token_ids == [0]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|endoftext|>hi<|endoftext|>"


def test_a_chat_template_sees_sep_cls_and_mask_tokens(tmp_path):
    template = "{{ cls_token }}{% for m in messages %}{{ m['content'] }}{{ sep_token }}{% endfor %}{{ mask_token }}"
    chat_model_dir(tmp_path, template)
    config = {"chat_template": template, "cls_token": "[C]", "sep_token": {"content": "[S]"}, "mask_token": "[M]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = LLM(str(tmp_path), backend="mock").tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[C]hi[S][M]"


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "3"], "top_p must be in"), (["--max-tokens", "0"], "max_tokens"),
    (["--chat"], "no chat template"), (["--model", "/no/such/model"], "model path does not exist"),
    (["caf\udcff"], "not valid Unicode")])  # bytes that are not UTF-8 on the command line
def test_generate_cli_turns_bad_input_into_a_usage_error(argv, message, capsys):
    from nanovllm_jax import generate

    with pytest.raises(SystemExit) as exit_:
        generate.main(["--backend", "mock", "hi", *argv])
    assert message in str(exit_.value.code) + capsys.readouterr().err


def test_generate_cli_names_a_cache_it_cannot_write(tmp_path, monkeypatch):
    from nanovllm_jax import generate

    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "blocked").write_text("a file where the cache dir should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    with pytest.raises(SystemExit, match="error: .*cannot write the cache dir .*set XDG_CACHE_HOME"):
        generate.main(["--model", str(tmp_path / "model.gguf"), "hi"])


def test_generate_cli_prints_each_prompt_and_its_text(capsys, llm):
    from nanovllm_jax import generate

    generate.main(["--backend", "mock", "first prompt", "second", "--max-tokens", "6", "--temperature", "0"])
    out = capsys.readouterr().out
    expected = llm.generate(["first prompt", "second"], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    for prompt, result in zip(["first prompt", "second"], expected):
        assert f"### {prompt}\n{result.text}\n[6 tokens, length]" in out


def test_generate_cli_streams_each_prompts_text(capsys, llm):
    from nanovllm_jax import generate

    prompts = ["first prompt", "second"]
    flags = ["--backend", "mock", "--stream", "--max-tokens", "6", "--temperature", "0"]
    expected = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    generate.main([*flags, prompts[0]])
    assert capsys.readouterr().out == expected[0].text + "\n"
    generate.main([*flags, *prompts])
    lines = capsys.readouterr().out.splitlines()
    for index, result in enumerate(expected):
        *pieces, end = [line[4:] for line in lines if line.startswith(f"[{index}] ")]
        assert all(pieces) and "".join(pieces) == result.text and end == "[6 tokens, length]"
    assert len(lines) == sum(1 for line in lines if line[:4] in ("[0] ", "[1] "))


def test_abort_from_another_thread_while_generate_steps():
    """The engine serializes its methods: abort() from another thread once broke a running step."""
    import threading

    llm = LLM(backend="mock", num_kvcache_blocks=30, kvcache_block_size=8)
    params = SamplingParams(max_tokens=30, **GREEDY)
    expected = llm.generate("hello world", params, use_tqdm=False)[0].token_ids
    stop = threading.Event()

    def abort_some():
        rng = np.random.default_rng(0)
        while not stop.is_set():
            request_id = int(rng.integers(0, 400))
            llm.engine.abort(request_id)
            stop.wait(0.0002)

    thread = threading.Thread(target=abort_some)
    thread.start()
    try:
        outs = [o for _ in range(10) for o in llm.generate(["hello world"] * 20, params, use_tqdm=False)]
    finally:
        stop.set()
        thread.join()
    assert {o.finish_reason for o in outs} == {"abort", "length"}
    for out in outs:
        assert out.token_ids == (expected if out.finish_reason == "length" else expected[: len(out.token_ids)])
    assert llm.engine.block_manager.num_free_blocks == 30


def test_generate_from_several_threads_at_once(llm):
    import threading

    params = SamplingParams(max_tokens=40, **GREEDY)
    prompts = [f"prompt number {i} " * (1 + i % 5) for i in range(8)]
    expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    results: dict[int, list] = {}

    def run(k):
        results[k] = [[o.token_ids for o in llm.generate(prompts[k::2], params, use_tqdm=False)] for _ in range(10)]

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[0] == [expected[0::2]] * 10 and results[1] == [expected[1::2]] * 10
    assert not llm.engine.requests and not llm._open and not llm._backlog


def test_a_model_dir_without_tokenizer_json_uses_its_slow_tokenizer_files(tmp_path):
    """vocab.json + merges.txt (no tokenizer.json): transformers converts them; ids equal the fast file's."""
    from nanovllm_jax.tokenizer import load_tokenizer

    bpe = json.loads(SIMPLE_BPE_PATH.read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(bpe["model"]["vocab"]))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in bpe["model"]["merges"]))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "eos_token": "<|endoftext|>"}))
    (tmp_path / "config.json").write_text("{}")
    slow = load_tokenizer(tmp_path)
    fast = LLM(backend="mock").tokenizer
    for text in PROMPTS:
        assert slow.encode(text) == fast.encode(text) and slow.decode(slow.encode(text)) == text
    assert slow.eos_token_ids == [0]
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_tokenizer(tmp_path)


def test_dtype_objects_are_read_by_their_numpy_name():
    """np.dtype('float16') compared equal to "float16" in the config's check, then failed in the loader."""
    import ml_dtypes

    for dtype, name in ((np.dtype("float16"), "float16"), (np.float32, "float32"), (ml_dtypes.bfloat16, "bfloat16")):
        got = LLM(backend="mock", dtype=dtype).config.dtype
        assert type(got) is str and got == name
    for bad in (np.float64, np.dtype("int8"), object(), 16):
        with pytest.raises(ValueError, match="dtype must be 'auto', 'float32', 'bfloat16' or 'float16'"):
            LLM(backend="mock", dtype=bad)


def test_an_empty_string_prompt_is_empty_even_where_the_tokenizer_adds_bos(monkeypatch):
    llm = LLM(backend="mock", dtype="auto")
    assert llm.config.dtype is None  # "auto", vLLM's spelling of the default: here the platform's
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text: [2] + llm.tokenizer._tok.encode(text).ids)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", use_tqdm=False)
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt_token_ids[0] == 2


def test_a_request_keeps_the_params_it_was_added_with():
    llm = LLM(backend="mock", max_model_len=256)
    params = SamplingParams(max_tokens=5, stop=["never"], **GREEDY)
    rid = llm.engine.add_request([20, 21, 22], params)
    params.max_tokens, params.temperature, params.logprobs = 50, 1.0, 3
    params.stop.append("")  # an empty stop string would stop at once
    while llm.engine.has_unfinished():
        llm.engine.step()
    out = llm.engine.release(rid)
    assert out.token_ids == mock_generate([20, 21, 22], SamplingParams(max_tokens=5, **GREEDY), 1024, set())
    assert out.logprobs is None and out.finish_reason == "length"


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("max_tokens", 0), ("top_p", 2.0), ("stop", [""])])
def test_params_changed_after_they_were_made_are_checked_again(field, value):
    llm = LLM(backend="mock", max_model_len=256)
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        llm.generate([[20, 21, 22]], params, use_tqdm=False)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("conversations, message", [
    ({"role": "user", "content": "hi"}, "conversations must be"), (None, "conversations must be"), ([], "conversations must be"),
    ([{"role": "user"}], "message 0 must be"), ([{"content": "hi"}], "message 0 must be"),
    ([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]], "message 1 must be"),
    ([[{"role": "user", "content": "hi"}], []], "a conversation must be a non-empty list"),
    ([{"role": "user", "content": "caf\ud800"}], "not valid Unicode"),
])
def test_bad_conversations_name_what_is_wrong(tmp_path, conversations, message):
    llm = LLM(str(chat_model_dir(tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}")), backend="mock")
    with pytest.raises(ValueError, match=message):
        llm.chat(conversations)
    assert not llm.engine.has_unfinished()


def chat_model_dir(path, template):
    shutil.copy(SIMPLE_BPE_PATH, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (path / "config.json").write_text("{}")
    return path


def test_tool_turns_are_messages(tmp_path):
    """An assistant turn that only calls tools has no content; a tool's result may be JSON (templates render it)."""
    template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] or m['tool_calls'][0]['name'] }};{% endfor %}"
    llm = LLM(str(chat_model_dir(tmp_path, template)), backend="mock")
    conversation = [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"name": "forecast"}]},
                    {"role": "tool", "content": {"sky": "sunny"}}]
    assert llm.chat_prompt(conversation) == llm.tokenizer.encode(
        "user:weather?;assistant:forecast;tool:{'sky': 'sunny'};", add_special_tokens=False)


@pytest.mark.parametrize("template", [5, {"a": 1}, "{% for %}", "{{ raise_exception('roles must alternate') }}"])
def test_a_chat_template_that_fails_is_a_value_error(tmp_path, template):
    llm = LLM(str(chat_model_dir(tmp_path, template)), backend="mock")
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("files, message", [
    ({"config.json": "[1]"}, "config.json must hold a JSON object"),
    ({"config.json": "{oops"}, "config.json is not valid JSON"),
    ({"generation_config.json": "[]"}, "generation_config.json must hold a JSON object"),
    ({"tokenizer_config.json": "null"}, "tokenizer_config.json must hold a JSON object"),
    ({"config.json": '{"eos_token_id": "2"}'}, "eos_token_id"),
    ({"tokenizer.json": "garbage"}, "cannot read .*tokenizer.json"),
    ({"config.json": '{"text_config": [1]}'}, "text_config"),
])
def test_malformed_model_files_are_named(tmp_path, files, message):
    shutil.copy(SIMPLE_BPE_PATH, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text("{}")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), backend="mock")


def test_a_model_dir_without_tokenizer_files_is_refused(tmp_path):
    """transformers builds an empty stand-in tokenizer for a known model type without tokenizer files."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match="no usable tokenizer"):
        LLM(str(tmp_path), backend="mock")


def test_eos_ids_outside_the_vocabulary_are_ignored(tmp_path):
    """An EOS id the model cannot sample stops nothing; banned under min_tokens, it once indexed past the
    logits inside a step and ended every request of the call stepping the engine."""
    shutil.copy(SIMPLE_BPE_PATH, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5000, -1]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**20, 5001], "bos_token_id": -1}))
    llm = LLM(str(tmp_path), backend="mock")
    assert llm.engine.eos_token_ids == frozenset()
    params = SamplingParams(max_tokens=5, min_tokens=3, **GREEDY)
    outs = llm.generate([[20, 21, 22], [7, 8]], params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [mock_generate(p, params, 1024, set()) for p in ([20, 21, 22], [7, 8])]


def test_eos_ids_come_from_generation_config_where_there_is_one(tmp_path):
    """As vLLM, which reads them through transformers' GenerationConfig: config.json's ids only stand in
    for a missing generation_config.json (a fine-tune's generation config may name fewer), and the
    tokenizer's eos_token is always one."""
    shutil.copy(SIMPLE_BPE_PATH, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert LLM(str(tmp_path), backend="mock").tokenizer.eos_token_ids == [7, 8]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert LLM(str(tmp_path), backend="mock").tokenizer.eos_token_ids == [9]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert LLM(str(tmp_path), backend="mock").tokenizer.eos_token_ids == [0, 9]  # <|endoftext|> is id 0


def test_a_keyboard_interrupt_while_reading_a_step_back_leaves_the_engine_consistent(monkeypatch):
    """Ctrl-C lands where the host waits for the device: in a step's read-back. The rows of that step
    are aborted as for any failed read-back (before, only Exception was caught: another open stream's
    request kept a placeholder token that was never filled, and the stream waited forever)."""
    llm = LLM(backend="mock", max_model_len=256)
    runner, engine = llm.engine.runner, llm.engine
    submit, submitted, fail_at = runner.submit, [], set()

    class Interrupted:
        def result(self):
            raise KeyboardInterrupt

    def interrupting(batch):
        submitted.append(batch)
        done = submit(batch)
        return Interrupted() if len(submitted) in fail_at else done

    monkeypatch.setattr(runner, "submit", interrupting)
    limit_steps(monkeypatch, engine)
    params = SamplingParams(max_tokens=12, **GREEDY)
    expected = mock_generate([20, 21, 22], params, runner.vocab_size, set())
    stream = llm.stream([[20, 21, 22]], params)
    got = list(next(stream).token_ids)
    fail_at.add(len(submitted) + 2)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    rest = list(stream)
    got += [t for delta in rest for t in delta.token_ids]
    assert rest[-1].finish_reason == "abort" and got == expected[: len(got)]
    assert llm.generate([[20, 21, 22]], params, use_tqdm=False)[0].token_ids == expected
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine.requests and bm.num_free_blocks == bm.num_blocks


def test_a_failure_of_the_step_left_in_flight_after_every_request_stopped_loses_no_news(monkeypatch):
    """The last step read back stops every request while one more step is in flight; that step is
    waited for, and fails: the deltas read before (the requests' final tokens and finish) come with
    the next step, as after a failed read-back (before, they were dropped: the engine reported nothing
    unfinished, and an open stream waiting on its finish stepped forever)."""
    llm = LLM(backend="mock", max_model_len=256)
    engine, runner = llm.engine, llm.engine.runner
    fail_at = set()
    submitted = fail_submits(monkeypatch, runner, fail_at)
    limit_steps(monkeypatch, engine)
    prompt = [5, 6, 7]
    free = mock_generate(prompt, SamplingParams(max_tokens=8, **GREEDY), runner.vocab_size, set())
    params = SamplingParams(max_tokens=8, stop_token_ids=[free[1]], **GREEDY)
    rid = engine.add_request(prompt, params)
    fail_at.add(len(submitted) + 3)  # the step in flight when token 2 (the stop token) is read back
    reported, failures = [], 0
    while engine.has_unfinished():
        try:
            reported += engine.step()
        except RuntimeError:
            failures += 1
    assert failures == 1
    assert [t for d in reported for t in d.token_ids] == free[:2]
    assert reported[-1].finished and reported[-1].finish_reason == "stop"
    assert engine.release(rid).token_ids == free[:2]
    assert engine._in_flight is None and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    # two streams: B's call steps the engine when A's request and B's stop together, and the step in flight fails
    free_b = mock_generate([8, 9], SamplingParams(max_tokens=8, **GREEDY), runner.vocab_size, set())
    a = llm.stream([prompt], SamplingParams(max_tokens=8, stop_token_ids=[free[3]], **GREEDY))
    got_a = list(next(a).token_ids)
    b = llm.stream([[8, 9]], SamplingParams(max_tokens=8, stop_token_ids=[free_b[1]], **GREEDY))
    fail_at.add(len(submitted) + 3)
    with pytest.raises(RuntimeError, match="device lost"):
        list(b)
    rest = list(a)
    assert got_a + [t for d in rest for t in d.token_ids] == free[:4] and rest[-1].finish_reason == "stop"
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_get_output_of_a_running_request_is_a_snapshot(llm):
    """Its logprobs match its token_ids and stay so: the list once was the engine's own, which grew on."""
    engine = llm.engine
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=6, logprobs=1, **GREEDY))
    for _ in range(3):
        engine.step()
    snapshot = engine.get_output(rid)
    assert len(snapshot.token_ids) == len(snapshot.logprobs) < 6
    while engine.has_unfinished():
        engine.step()
    final = engine.release(rid)
    assert len(snapshot.logprobs) == len(snapshot.token_ids) and len(final.logprobs) == len(final.token_ids) == 6
    assert final.logprobs[: len(snapshot.logprobs)] == snapshot.logprobs


def _llama2_style_tokenizer():
    """Llama 2's kind of tokenizer.json: "▁" for spaces, byte fallback, a decoder stripping the leading space."""
    from tokenizers import Tokenizer, decoders, models

    from nanovllm_jax.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "▁the": 260}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return HFTokenizer(tok, eos_token_ids=[2], bos_token_id=1)


def _detokenize(tok, prompt: list[int], output: list[int]) -> str:
    from nanovllm_jax.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tok, prompt)
    return "".join(detok.add(t) for t in output) + detok.flush()


def test_detokenizer_keeps_spaces_a_decoder_strips_from_a_lone_space_token():
    """Llama 2's decoder strips the leading space, so "▁" alone decodes to nothing: after a prompt without
    text (the BOS alone) it must still not be taken for a token without text, as vLLM keeps it."""
    tok = _llama2_style_tokenizer()
    output = [259, 259, 260]  # "▁", "▁", "▁the"
    for prompt in ([1], [1, tok.vocab_size + 7]):
        assert _detokenize(tok, prompt, output) == tok.decode(prompt + output) == "  the"


def test_detokenizer_window_starts_at_a_character_boundary():
    """The prompt's last 6 tokens may start inside a character; with byte fallback a run of byte tokens
    that is not valid UTF-8 decodes all as U+FFFD, so an output starting with byte tokens (an emoji
    after an emoji) came out as U+FFFDs."""
    tok = _llama2_style_tokenizer()
    fox, grin = [3 + b for b in "🦊".encode()], [3 + b for b in "😀".encode()]
    prompt, output = [1, 259] + fox + fox, grin + [260]
    assert _detokenize(tok, prompt, output) == "😀 the"
    assert _detokenize(tok, prompt, []) == ""


def _byte_level_tokenizer():
    """Qwen's / Llama 3's kind of tokenizer.json: byte-level BPE (here without merges: a token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from nanovllm_jax.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(tok, eos_token_ids=[])


def test_detokenizer_prompt_ending_inside_a_character():
    """A prompt of token ids may end inside a character (cut from an output that max_tokens stopped inside
    an emoji): the output's bytes that complete it make it output text, as vLLM's DecodeStream primed with
    the prompt emits it. Its U+FFFDs were dropped with the character, or took the output's first text."""
    tok = _byte_level_tokenizer()
    prompt = tok.encode("a 🦊")
    prompt, output = prompt[:-1], prompt[-1:] + tok.encode("🦊 x")
    assert _detokenize(tok, prompt, output) == "🦊🦊 x"
    assert _detokenize(tok, prompt[:-1], prompt[-1:] + output[:1]) == "🦊"  # completed by the last token: flush
    # a U+FFFD the prompt holds as a character stays prompt text, before an unfinished character too
    assert _detokenize(tok, tok.encode("x\ufffd"), tok.encode(" y")) == " y"
    ids = tok.encode("x\ufffd🦊")
    assert _detokenize(tok, ids[:-2], ids[-2:]) == "🦊"

    tok = _llama2_style_tokenizer()
    fox, grin = [3 + b for b in "🦊".encode()], [3 + b for b in "😀".encode()]
    assert _detokenize(tok, [1, 259] + fox[:2], fox[2:] + [260]) == "🦊 the"
    # the window (the prompt's last 6 tokens) starts at the grin's first byte, though the byte run that
    # ends unfinished decodes all as U+FFFD
    assert _detokenize(tok, [1, 259] + grin + grin + fox[:2], fox[2:]) == "🦊"

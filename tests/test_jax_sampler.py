"""The on-device sampler against the numpy reference (backends/sampler.py) on its deterministic parts."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backends import sampler as ref
from nanovllm_jax.jax_runner import sampler_kind
from nanovllm_jax.layers import sampler
from nanovllm_jax.runner import SamplingBatch

VOCAB = 64


def batch(rows: int, **overrides) -> SamplingBatch:
    fields = dict(
        temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32), seeds=np.arange(rows, dtype=np.uint32),
        repetition_penalty=np.ones(rows, np.float32), presence_penalty=np.zeros(rows, np.float32),
        frequency_penalty=np.zeros(rows, np.float32), prompt_lens=np.full(rows, 5, np.int32),
        banned_token_ids=np.full((rows, 1), -1, np.int32), num_logprobs=0,
    )
    fields.update({k: np.asarray(v, fields[k].dtype) if k in fields and k != "num_logprobs" else v
                   for k, v in overrides.items()})
    return SamplingBatch(**fields)


def device_inputs(sb: SamplingBatch, context_lens: np.ndarray) -> sampler.SamplingInputs:
    return sampler.SamplingInputs(
        temperature=jnp.asarray(sb.temperature), top_k=jnp.asarray(sb.top_k), top_p=jnp.asarray(sb.top_p),
        min_p=jnp.asarray(sb.min_p), seeds=jnp.asarray(sb.seeds, jnp.uint32),
        repetition_penalty=jnp.asarray(sb.repetition_penalty), presence_penalty=jnp.asarray(sb.presence_penalty),
        frequency_penalty=jnp.asarray(sb.frequency_penalty), prompt_lens=jnp.asarray(sb.prompt_lens),
        context_lens=jnp.asarray(context_lens, jnp.int32), banned_token_ids=jnp.asarray(sb.banned_token_ids),
        use_penalties=jnp.int32(sb.needs_penalties), use_logprobs=jnp.int32(sb.num_logprobs > 0),
    )


def run(logits: np.ndarray, sb: SamplingBatch, contexts: list[np.ndarray], kind: str = "full") -> sampler.SampleOutput:
    width = max(len(c) for c in contexts)
    tokens = np.zeros((len(contexts), width), np.int32)
    valid = np.zeros((len(contexts), width), bool)
    for row, c in enumerate(contexts):
        tokens[row, : len(c)], valid[row, : len(c)] = c, True
    context_lens = np.array([len(c) for c in contexts])
    fn = jax.jit(lambda lg, s: sampler.sample(lg, s, lambda: (jnp.asarray(tokens), jnp.asarray(valid)), kind))
    return jax.tree.map(np.asarray, fn(jnp.asarray(logits), device_inputs(sb, context_lens)))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    rows = 6
    logits = (rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    contexts = [rng.integers(0, VOCAB, size=n).astype(np.int32) for n in (5, 9, 12, 7, 20, 6)]
    return logits, contexts


def test_greedy_with_penalties_and_banned_ids_matches_reference(data):
    logits, contexts = data
    sb = batch(6, repetition_penalty=[1.0, 1.5, 0.7, 1.2, 2.0, 1.0], presence_penalty=[0, 0.5, 0, 1.0, 0.3, 0],
               frequency_penalty=[0, 0, 0.8, 0.2, 1.5, 0],
               banned_token_ids=[[-1, -1], [3, -1], [-1, -1], [int(np.argmax(logits[3])), 7], [-1, -1], [1, 2]])
    expected = ref.sample(logits, sb, np.array([len(c) for c in contexts]), contexts)
    got = run(logits, sb, contexts)
    np.testing.assert_array_equal(got.token_ids, expected.token_ids)
    # penalties change the argmax somewhere, or this test would not test them
    assert (expected.token_ids != np.argmax(logits, -1)).any()


def test_logprobs_are_raw_log_softmax(data):
    logits, contexts = data
    sb = batch(6, num_logprobs=5, repetition_penalty=[1.3] * 6)
    expected = ref.sample(logits, sb, np.array([len(c) for c in contexts]), contexts)
    got = run(logits, sb, contexts)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.top_token_ids[:, :5], expected.top_token_ids)
    np.testing.assert_allclose(got.top_logprobs[:, :5], expected.top_logprobs, rtol=1e-5, atol=1e-5)


def kept_weights(logits, s, candidates):
    ones = jnp.ones((logits.shape[0], 1))
    return sampler.filter_cutoff(logits, ones, logits.max(axis=-1, keepdims=True), s, candidates).weights(logits, jnp.arange(logits.shape[-1])[None, :])


@pytest.mark.parametrize("candidates", [VOCAB, 8])  # 8: top-k 10 and wide nuclei fall back to the sort
@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.1), (10, 0.9, 0.05), (1, 1.0, 0.0)])
def test_filters_match_reference(data, top_k, top_p, min_p, candidates):
    logits, _ = data
    s = device_inputs(batch(6, temperature=[1.0] * 6, top_k=[top_k] * 6, top_p=[top_p] * 6, min_p=[min_p] * 6),
                      np.ones(6))
    kept = np.asarray(jax.jit(kept_weights, static_argnums=2)(jnp.asarray(logits), s, candidates)) > 0
    for row in range(6):
        expected = ref.filter_logits(logits[row], top_k, top_p, min_p)
        np.testing.assert_array_equal(kept[row], np.isfinite(expected))
        host = ref.filter_logits(logits[row], top_k, top_p, min_p, candidates)  # the reference's own shortcut
        np.testing.assert_array_equal(host, expected)


def test_filters_apply_per_row(data):
    """Rows with and without ranking filters in one batch each get their own."""
    logits, _ = data
    top_k, top_p, min_p = [3, 0, 0, 40, 0, 2], [1.0, 0.5, 1.0, 0.99, 1.0, 0.3], [0.0, 0.0, 0.2, 0.0, 0.0, 0.5]
    for candidates in (VOCAB, 8):
        s = device_inputs(batch(6, temperature=[1.0] * 6, top_k=top_k, top_p=top_p, min_p=min_p), np.ones(6))
        kept = np.asarray(jax.jit(kept_weights, static_argnums=2)(jnp.asarray(logits), s, candidates)) > 0
        for row in range(6):
            expected = ref.filter_logits(logits[row], top_k[row], top_p[row], min_p[row])
            np.testing.assert_array_equal(kept[row], np.isfinite(expected))


def test_draw_follows_the_softmax():
    """The inverse-CDF draw is a categorical sample: frequencies over many uniforms match the
    weights, and zero-weight tokens are never drawn, even at u close to 1."""
    rng = np.random.default_rng(1)
    vocab = 300  # not a multiple of the block width: the padded tail must never be drawn
    weights = np.exp(rng.standard_normal(vocab).astype(np.float32) * 2)
    weights[rng.choice(vocab, 100, replace=False)] = 0
    probs = weights / weights.sum()
    n = 100_000
    uniforms = rng.random((n, 2), dtype=np.float32)
    uniforms[:50] = np.float32(1) - np.finfo(np.float32).epsneg  # the largest float32 below 1
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(weights)), (n, vocab))  # log 0 = -inf: never kept

    def draw_all(logits, uniforms):
        keep_all = sampler.Cutoff.keep_all(logits.max(axis=-1, keepdims=True), vocab)
        return sampler.draw(sampler.vocab_blocks(logits), jnp.ones((n, 1)), keep_all, uniforms)

    tokens = np.asarray(jax.jit(draw_all)(logits, jnp.asarray(uniforms)))
    assert (weights[tokens] > 0).all()
    counts = np.bincount(tokens, minlength=vocab)
    expected = probs * n
    big = expected > 50
    # within 5 standard deviations of the binomial count for every token
    assert (np.abs(counts[big] - expected[big]) < 5 * np.sqrt(expected[big]) + 1).all()


def test_seeded_sampling_is_independent_of_batch_composition(data):
    logits, contexts = data
    sb = batch(6, temperature=[0.9] * 6, top_p=[0.95] * 6, seeds=[7, 7, 8, 9, 10, 11])
    together = run(logits, sb, contexts).token_ids
    for row in range(6):
        alone = batch(1, temperature=[0.9], top_p=[0.95], seeds=[sb.seeds[row]])
        assert run(logits[row: row + 1], alone, [contexts[row]]).token_ids[0] == together[row]
    # a row's draw depends on (seed, context length), so another seed or position draws differently
    draws = {int(run(logits[:1], batch(1, temperature=[5.0], seeds=[s]), [contexts[0]]).token_ids[0]) for s in range(12)}
    assert len(draws) > 1


def test_top_k_one_equals_greedy(data):
    logits, contexts = data
    got = run(logits, batch(6, temperature=[1.0] * 6, top_k=[1] * 6), contexts).token_ids
    np.testing.assert_array_equal(got, np.argmax(logits, -1))


def test_rows_draw_alike_in_every_sampler_program(data):
    """A row with temperature only draws the same token in the program the host picks where every row
    is like it ("plain": no lax.cond), and in "full", where no row filters (its cheap mass pass) or
    another row has min-p, top-p, penalties or logprobs (its filtering pass, the penalties' scatter);
    greedy rows take their argmax in "greedy" and "full" alike."""
    logits, contexts = data
    plain = dict(temperature=[0.8] * 6, seeds=[3, 4, 5, 6, 7, 8])
    assert sampler_kind(batch(6, **plain)) == "plain"
    alone = run(logits, batch(6, **plain), contexts, kind="plain").token_ids
    np.testing.assert_array_equal(run(logits, batch(6, **plain), contexts, kind="full").token_ids, alone)
    others = (dict(min_p=[0.2, 0, 0, 0, 0, 0]), dict(top_p=[0.5, 1, 1, 1, 1, 1]),
              dict(repetition_penalty=[1.3, 1, 1, 1, 1, 1]), dict(num_logprobs=2))
    for other in others:
        assert sampler_kind(batch(6, **plain, **other)) == "full"
        mixed = run(logits, batch(6, **plain, **other), contexts).token_ids
        np.testing.assert_array_equal(mixed[1:], alone[1:])
    assert sampler_kind(batch(6, top_p=[0.5] * 6, top_k=[3] * 6)) == "greedy"  # filters of greedy rows change nothing
    for kind in ("greedy", "full"):
        np.testing.assert_array_equal(run(logits, batch(6), contexts, kind=kind).token_ids, np.argmax(logits, -1))


def test_sampler_kind_sees_every_feature():
    temp = dict(temperature=[0.0, 0.7])
    assert sampler_kind(batch(2, **temp)) == "plain"
    for feature in (dict(top_k=[0, 5]), dict(top_p=[1.0, 0.9]), dict(min_p=[0.0, 0.1]), dict(num_logprobs=1),
                    dict(presence_penalty=[0.5, 0.0]), dict(banned_token_ids=[[-1], [3]])):
        assert sampler_kind(batch(2, **temp, **feature)) == "full", feature
    with pytest.raises(ValueError, match="kind"):
        sampler.sample(jnp.zeros((1, VOCAB)), device_inputs(batch(1), np.ones(1)), lambda: None, kind="fast")


@pytest.mark.parametrize("candidates", [VOCAB, 8])
def test_filters_keep_lower_ids_among_tied_logits(candidates):
    """Many exact ties at the cutoff: top-k and top-p keep the tied tokens with the lower ids,
    whether ranked among candidates or found by bisection over the whole row."""
    rng = np.random.default_rng(2)
    logits = np.round(rng.standard_normal((6, VOCAB)) * 1.5).astype(np.float32)
    top_k, top_p = [3, 0, 12, 20, 0, 7], [1.0, 0.3, 0.9, 0.5, 0.75, 0.6]
    s = device_inputs(batch(6, temperature=[1.0] * 6, top_k=top_k, top_p=top_p), np.ones(6))
    kept = np.asarray(jax.jit(kept_weights, static_argnums=2)(jnp.asarray(logits), s, candidates)) > 0
    for row in range(6):
        expected = ref.filter_logits(logits[row], top_k[row], top_p[row], 0.0)
        np.testing.assert_array_equal(kept[row], np.isfinite(expected), err_msg=f"row {row}")


def vllm_kept(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Which tokens of one row of logits / temperature vLLM's v1 sampler can draw, written after it in
    float64 numpy: Sampler.sample runs the min-p logits processor (a token whose probability is below
    min_p times the top one's goes to -inf), then apply_top_k_top_p: sort ascending, top-k masks all
    but the last top_k, top-p takes the softmax of what is left and masks where its ascending
    cumulative sum is <= 1 - top_p, never the last (the top token). Among ties the lower id ranks
    higher: it sorts after the higher ids (vLLM's Triton top-k/top-p kernel keeps a tie group's
    first ids)."""
    x = logits.astype(np.float64)
    n = len(x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    order = np.lexsort((-np.arange(n), x))  # ascending value, then descending id
    ranked = x[order]
    if 0 < top_k < n:
        ranked[: n - top_k] = -np.inf
    if top_p < 1.0:
        p = np.exp(ranked - ranked.max())
        p /= p.sum()
        mask = np.cumsum(p) <= 1 - top_p
        mask[-1] = False
        ranked[mask] = -np.inf
    kept = np.zeros(n, bool)
    kept[order] = np.isfinite(ranked)
    return kept


def jax_kept(logits: np.ndarray, top_k, top_p, min_p, candidates: int) -> np.ndarray:
    rows = len(logits)
    s = device_inputs(batch(rows, temperature=[1.0] * rows, top_k=top_k, top_p=top_p, min_p=min_p), np.ones(rows))
    return np.asarray(jax.jit(kept_weights, static_argnums=2)(jnp.asarray(logits), s, candidates)) > 0


def test_top_p_renormalizes_over_what_min_p_and_top_k_keep():
    """vLLM (and HF's TopK -> TopP warpers) take the nucleus of the distribution the earlier filters
    left, renormalized: top_k=2 of [.35, .3, .2, .15] is [.54, .46], so top_p=0.5 keeps only the
    first; min_p=0.3 of [.4, .3, .2, .1] keeps three, [.44, .33, .22], so top_p=0.75 keeps two."""
    logits = np.log(np.array([[0.35, 0.30, 0.20, 0.15], [0.4, 0.3, 0.2, 0.1]])).astype(np.float32)
    top_k, top_p, min_p = [2, 0], [0.5, 0.75], [0.0, 0.3]
    expected = np.array([[True, False, False, False], [True, True, False, False]])
    for row in range(2):
        np.testing.assert_array_equal(vllm_kept(logits[row], top_k[row], top_p[row], min_p[row]), expected[row])
        np.testing.assert_array_equal(np.isfinite(ref.filter_logits(logits[row], top_k[row], top_p[row], min_p[row])),
                                      expected[row])
    for candidates in (4, 2):  # 2: the min-p row's nucleus is found over the whole row
        np.testing.assert_array_equal(jax_kept(logits, top_k, top_p, min_p, candidates), expected)


@pytest.mark.parametrize("candidates", [VOCAB, 8])  # 8: wide top-k, min-p and nuclei reach past the candidates
def test_filters_match_vllm_reference(candidates):
    """Both samplers keep exactly the tokens vLLM's order and semantics keep, over every token of
    rows with random logits (half of them with many exact ties, -0.0 among them) and every
    combination of filters. The top_p values are exact in binary: a nucleus that ends exactly on a
    tie group (p times its size an integer) then ends alike in float32 and in the float64 reference."""
    rng = np.random.default_rng(3)
    rows = 96
    logits = (rng.standard_normal((rows, VOCAB)) * rng.choice([0.5, 2.0, 4.0], (rows, 1))).astype(np.float32)
    logits[::2] = np.round(logits[::2] * 2) / 2  # ties
    logits[::6] = np.where(logits[::6] == 0, -0.0, logits[::6])  # -0.0 ties 0.0
    top_k = rng.choice([0, 1, 2, 5, 12, 30, 63], rows)
    top_p = rng.choice([1.0, 0.9921875, 0.9375, 0.75, 0.5, 0.25], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.01, 0.05, 0.3], rows).astype(np.float32)
    kept = jax_kept(logits, top_k, top_p, min_p, candidates)
    for row in range(rows):
        args = int(top_k[row]), float(top_p[row]), float(min_p[row])
        expected = vllm_kept(logits[row], *args)
        np.testing.assert_array_equal(np.isfinite(ref.filter_logits(logits[row], *args, candidates)), expected,
                                      err_msg=f"numpy sampler, row {row}, (top_k, top_p, min_p) = {args}")
        np.testing.assert_array_equal(kept[row], expected, err_msg=f"JAX sampler, row {row}, {args}")


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 0.9, 0.0), (0, 0.9, 0.1), (4, 0.8, 0.1), (0, 1.0, 0.25)])
def test_draws_follow_the_vllm_kept_distribution(top_k, top_p, min_p):
    """Many seeded draws (temperature 0.7) of one row: both samplers draw exactly the tokens the
    reference keeps, each about as often as its renormalized probability."""
    rng = np.random.default_rng(4)
    vocab, n, temperature = 12, 3000, 0.7
    row = (rng.standard_normal(vocab) * 0.8).astype(np.float32)
    scaled = row / np.float32(temperature)
    kept = vllm_kept(scaled, top_k, top_p, min_p)
    probs = np.where(kept, np.exp(scaled.astype(np.float64) - scaled.max()), 0.0)
    probs /= probs.sum()
    sb = batch(n, temperature=[temperature] * n, top_k=[top_k] * n, top_p=[top_p] * n, min_p=[min_p] * n,
               seeds=np.arange(n), prompt_lens=[1] * n)
    logits = np.tile(row, (n, 1))
    contexts = [np.array([1, 2], np.int32)] * n
    host = ref.sample(logits, sb, np.full(n, 2), contexts).token_ids
    device = run(logits, sb, contexts).token_ids
    for name, tokens in (("numpy", host), ("jax", device)):
        counts = np.bincount(tokens, minlength=vocab)
        np.testing.assert_array_equal(counts > 0, kept, err_msg=f"{name} sampler drew outside the kept set")
        assert (np.abs(counts - probs * n) < 5 * np.sqrt(probs * n) + 2).all(), (name, counts, probs * n)


def test_top_k_ties_past_the_candidates_keep_lower_ids():
    """Many exact ties across the CANDIDATES-th value: the numpy sampler's candidate pick keeps the
    lower ids of the tie (it kept arbitrary ones), as the JAX sampler and the reference do."""
    rng = np.random.default_rng(5)
    vocab, k = 600, 256
    logits = (np.round(rng.standard_normal((1, vocab)) * 3) + 0.5).astype(np.float32)
    expected = vllm_kept(logits[0], k, 1.0, 0.0)
    assert expected.sum() == k
    np.testing.assert_array_equal(np.isfinite(ref.filter_logits(logits[0], k, 1.0, 0.0)), expected)
    np.testing.assert_array_equal(jax_kept(logits, [k], [1.0], [0.0], sampler.CANDIDATES)[0], expected)
    for top_p in (0.9, 0.999):  # a nucleus over the tie group, among the candidates or by bisection
        expected = vllm_kept(logits[0], k, top_p, 0.0)
        np.testing.assert_array_equal(np.isfinite(ref.filter_logits(logits[0], k, top_p, 0.0)), expected)
        np.testing.assert_array_equal(jax_kept(logits, [k], [top_p], [0.0], sampler.CANDIDATES)[0], expected)


def test_sampling_always_returns_an_id_of_the_row():
    """Rows without a distribution to draw from (weights that all round to 0 or overflow at extreme
    temperatures, every logit -inf) get the row's argmax, never an id past the vocabulary."""
    vocab = 1000
    rng = np.random.default_rng(0)
    temperatures = [1e-30, 1e-38, 1e-44, np.inf]
    filters = dict(top_k=[0, 5, 0, 0], top_p=[1.0, 1.0, 0.5, 1.0], min_p=[0.0, 0.0, 0.0, 0.1])
    rows = len(temperatures) * 4  # every temperature with no filter, top-k, top-p and min-p
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    logits[-1] = -np.inf  # e.g. every id banned
    contexts = [np.arange(5, dtype=np.int32)] * rows
    sb = batch(rows, temperature=np.repeat(temperatures, 4), seeds=np.arange(rows),
               **{name: np.tile(values, len(temperatures)) for name, values in filters.items()})
    tokens = run(logits, sb, contexts).token_ids
    assert ((tokens >= 0) & (tokens < vocab)).all(), tokens
    tiny = sb.temperature < 1  # the limit of a vanishing temperature
    np.testing.assert_array_equal(tokens[tiny], np.argmax(logits[tiny], -1))
    with np.errstate(all="ignore"):  # inf - inf and the like: no distribution
        host = ref.sample(logits, sb, np.full(rows, 5), contexts).token_ids
    assert host[-1] == tokens[-1] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("vocab", [VOCAB, 4099, 1 << 18])  # XLA:CPU's vectorized max skips NaN in long rows
def test_a_row_with_nan_or_inf_logits_takes_its_argmax_in_both_samplers(data, bad, vocab):
    """No distribution to draw from: the first NaN, else the first +inf, whatever the filters and
    the sampler program."""
    _, contexts = data
    logits = (np.random.default_rng(vocab).standard_normal((6, vocab)) * 3).astype(np.float32)
    first = vocab // 2 + 1
    logits[:, first], logits[:, vocab - 3] = bad, bad
    sb = batch(6, temperature=[0.0, 1.0, 1.0, 1.0, 0.7, 1.3], top_k=[0, 0, 5, 0, 0, 3],
               top_p=[1, 1, 1, 0.5, 1, 0.9], min_p=[0, 0, 0, 0, 0.1, 0])
    for num_logprobs in (0, 3):
        sb = dataclasses.replace(sb, num_logprobs=num_logprobs)
        with np.errstate(all="ignore"):
            host = ref.sample(logits, sb, np.array([len(c) for c in contexts]), contexts)
        np.testing.assert_array_equal(host.token_ids, np.full(6, first))
        np.testing.assert_array_equal(run(logits, sb, contexts).token_ids, host.token_ids)
        if num_logprobs:  # log_softmax is NaN throughout: both rank NaN as -inf, so the top ids are 0, 1, 2
            np.testing.assert_array_equal(host.top_token_ids, np.tile(np.arange(3), (6, 1)))
            np.testing.assert_array_equal(run(logits, sb, contexts).top_token_ids[:, :3], host.top_token_ids)
    for kind, rows in (("greedy", batch(6)), ("plain", batch(6, temperature=[0.0, 1.0, 0.5, 1.0, 0.7, 1.3]))):
        np.testing.assert_array_equal(run(logits, rows, contexts, kind=kind).token_ids, np.full(6, first))


def test_banned_ids_do_not_change_the_logprobs_of_either_sampler(data):
    """Logprobs are of the raw logits: a stop id banned under min_tokens keeps its place in the top list."""
    logits, contexts = data
    best = np.argmax(logits, -1)
    sb = batch(6, num_logprobs=3, banned_token_ids=best[:, None])
    expected = ref.log_softmax(logits)
    for out in (ref.sample(logits, sb, np.array([len(c) for c in contexts]), contexts), run(logits, sb, contexts)):
        assert (out.token_ids != best).all()
        np.testing.assert_array_equal(out.top_token_ids[:, 0], best)
        np.testing.assert_allclose(out.logprobs, expected[np.arange(6), out.token_ids], rtol=1e-5, atol=1e-5)


def test_both_samplers_rank_the_sampled_token_as_vllm(data):
    """The sampled token's rank is vLLM's: how many raw logprobs are >= its own (a tie ranks it last),
    whatever temperature, bans or penalties chose it."""
    logits, contexts = data
    logits = np.round(logits / 2).astype(np.float32)  # ties
    sb = batch(6, num_logprobs=2, temperature=[0.0, 3.0, 3.0, 5.0, 5.0, 0.0], repetition_penalty=[1.5] * 6,
               banned_token_ids=np.argmax(logits, -1)[:, None])
    raw = ref.log_softmax(logits)
    for out in (ref.sample(logits, sb, np.array([len(c) for c in contexts]), contexts), run(logits, sb, contexts)):
        expected = (raw >= raw[np.arange(6), out.token_ids][:, None]).sum(-1)
        np.testing.assert_array_equal(out.ranks, expected)
        assert (expected > 1).all()  # the argmax is banned


def test_top_logprobs_break_ties_by_lower_id_and_stop_at_the_vocabulary():
    logits = np.zeros((2, 12), np.float32)
    logits[:, [5, 9]] = 1.0
    contexts = [np.arange(5, dtype=np.int32)] * 2
    for num_logprobs, expected in ((5, [5, 9, 0, 1, 2]), (20, [5, 9, 0, 1, 2, 3, 4, 6, 7, 8, 10, 11])):
        sb = batch(2, num_logprobs=num_logprobs)
        host = ref.sample(logits, sb, np.full(2, 5), contexts).top_token_ids
        np.testing.assert_array_equal(host, [expected] * 2)
        np.testing.assert_array_equal(run(logits, sb, contexts).top_token_ids[:, : len(expected)], host)

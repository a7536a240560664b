"""On-device sampling with per-row parameters (same semantics as backends/sampler.py).

Order: logprobs from the raw logits; repetition / frequency / presence penalties; banned ids;
then greedy (temperature 0) or temperature, top-k, top-p, min-p and an inverse-CDF draw with
uniforms keyed by fold_in(PRNGKey(seed), context_len), so a row samples alike in any batch.
The costly parts (penalty counts, the top-k/top-p ranking, log_softmax + top-N) sit behind
lax.cond on step flags computed on the host: a greedy batch without penalties or logprobs pays
for an argmax only, with one compiled program per bucket.

Kept cheap for large vocabularies on CPU (Gemma's 262k): top-k/top-p rank only the best
CANDIDATES tokens unless a row needs more (a full sort costs ~70 ms per row there), and the
draw needs two uniforms per row, not a noise value per vocabulary entry.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # SamplingParams caps logprobs at 20; the host slices the N a step asked for


class SamplingInputs(NamedTuple):
    temperature: jax.Array  # f32[S]
    top_k: jax.Array  # i32[S]; 0 off
    top_p: jax.Array  # f32[S]; 1 off
    min_p: jax.Array  # f32[S]; 0 off
    seeds: jax.Array  # u32[S]
    repetition_penalty: jax.Array  # f32[S]
    presence_penalty: jax.Array  # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    prompt_lens: jax.Array  # i32[S]
    context_lens: jax.Array  # i32[S]
    banned_token_ids: jax.Array  # i32[S, K]; -1 padded
    # step flags (i32 scalars, nonzero = on)
    use_penalties: jax.Array
    use_logprobs: jax.Array
    use_random: jax.Array  # some row has temperature > 0


class SampleOutput(NamedTuple):
    token_ids: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]
    top_token_ids: jax.Array  # i32[S, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[S, MAX_LOGPROBS]


ContextFn = Callable[[], tuple[jax.Array, jax.Array]]  # -> (token ids i32[S, W], valid bool[S, W])


def apply_penalties(logits: jax.Array, s: SamplingInputs, context: ContextFn) -> jax.Array:
    tokens, valid = context()
    rows, width = tokens.shape
    vocab = logits.shape[-1]
    is_output = valid & (jnp.arange(width)[None, :] >= s.prompt_lens[:, None])
    row_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], tokens.shape)
    tokens = jnp.where(valid, tokens, vocab)  # invalid entries fall out of range and are dropped
    seen = jnp.zeros((rows, vocab), bool).at[row_ids, tokens].set(True, mode="drop")
    counts = jnp.zeros((rows, vocab), jnp.float32).at[row_ids, tokens].add(is_output.astype(jnp.float32), mode="drop")
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s.frequency_penalty[:, None] * counts
    return logits - s.presence_penalty[:, None] * (counts > 0)


CANDIDATES = 256  # tokens ranked for top-k/top-p, unless some row's top-k or nucleus needs more


def _blocks(x: jax.Array, fill: float) -> jax.Array:
    """[S, V] -> [S, V / width, width] with width about sqrt(V), padding the tail with `fill`."""
    rows, vocab = x.shape
    width = 1 << ((vocab.bit_length() + 1) // 2)
    return jnp.pad(x, ((0, 0), (0, -vocab % width)), constant_values=fill).reshape(rows, -1, width)


def argmax(x: jax.Array) -> jax.Array:
    """First index of each row's maximum, in two levels (best block, then best in it): XLA:CPU's
    argmax over a 262k row is a slow scalar loop, its plain max reduces are vectorized."""
    blocks = _blocks(x, -jnp.inf)
    block = jnp.argmax(blocks.max(axis=-1), axis=-1).astype(jnp.int32)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    return block * blocks.shape[-1] + jnp.argmax(inside, axis=-1).astype(jnp.int32)


def _keep_ranked(probs: jax.Array, s: SamplingInputs) -> jax.Array:
    """Which of the ranked (descending) probabilities [S, K] survive top-k, top-p and min-p."""
    rank = jnp.arange(probs.shape[-1])[None, :]
    keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before the token
    keep &= (s.top_p[:, None] >= 1.0) | (before < s.top_p[:, None])
    return keep & (probs >= s.min_p[:, None] * probs[:, :1])


def filter_logits(scaled: jax.Array, s: SamplingInputs, candidates: int = CANDIDATES) -> jax.Array:
    """top-k, top-p and min-p; ties keep the lower token id. Rows without top-k/top-p only pay for
    min-p; the others rank the best `candidates` tokens, or the whole row (a sort) when some row's
    top-k exceeds them or its nucleus is not inside them."""
    rows, vocab = scaled.shape
    top = scaled.max(axis=-1, keepdims=True)
    unnormalized = jnp.exp(scaled - top)
    total = unnormalized.sum(axis=-1, keepdims=True)
    keep = unnormalized >= s.min_p[:, None]  # the top token's unnormalized probability is 1
    ranks = ((s.top_k > 0) | (s.top_p < 1.0)) & (s.temperature > 0)
    row_ids = jnp.arange(rows)[:, None]

    def ranked(keep):
        k = min(candidates, vocab)
        values, ids = jax.lax.top_k(scaled, k)
        probs = jnp.exp(values - top) / total
        covered = ((s.top_k > 0) & (s.top_k <= k)) | ((s.top_p < 1.0) & (probs.sum(axis=-1) >= s.top_p))

        def from_candidates(_):
            return jnp.zeros((rows, vocab), bool).at[row_ids, ids].set(_keep_ranked(probs, s))

        def from_sort(_):
            order = jnp.argsort(-scaled, axis=-1, stable=True)
            ranked = jnp.exp(jnp.take_along_axis(scaled, order, axis=-1) - top) / total
            return jnp.zeros((rows, vocab), bool).at[row_ids, order].set(_keep_ranked(ranked, s))

        ranked_keep = jax.lax.cond(jnp.any(ranks & ~covered), from_sort, from_candidates, None)
        return jnp.where(ranks[:, None], ranked_keep, keep)

    keep = jax.lax.cond(jnp.any(ranks), ranked, lambda keep: keep, keep)
    return jnp.where(keep, scaled, -jnp.inf)


def draw(logits: jax.Array, uniforms: jax.Array) -> jax.Array:
    """One token per row from softmax(logits) by inverse CDF, with uniforms [S, 2] in [0, 1).

    Two levels keep it O(V) with short cumulative sums: the first uniform picks a block of the
    vocabulary by block mass, the second a token inside that block by its mass there."""
    probs = _blocks(jnp.exp(logits - logits.max(axis=-1, keepdims=True)), 0.0)

    def pick(cumulative: jax.Array, u: jax.Array) -> jax.Array:
        total = cumulative[:, -1:]
        # below the total, so the count stops before any zero-mass tail
        target = jnp.minimum(u[:, None] * total, jnp.nextafter(total, 0.0))
        return jnp.sum(cumulative <= target, axis=-1).astype(jnp.int32)

    block = pick(jnp.cumsum(probs.sum(axis=-1), axis=-1), uniforms[:, 0])
    inside = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]
    return block * probs.shape[-1] + pick(jnp.cumsum(inside, axis=-1), uniforms[:, 1])


def _uniforms(seed: jax.Array, context_len: jax.Array) -> jax.Array:
    return jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(seed), context_len), (2,), jnp.float32)


def sample(logits: jax.Array, s: SamplingInputs, context: ContextFn) -> SampleOutput:
    """logits f32[S, V] -> one token per row (plus logprobs when the step asks for them)."""
    raw = logits.astype(jnp.float32)
    rows, vocab = raw.shape
    logits = jax.lax.cond(s.use_penalties != 0, lambda x: apply_penalties(x, s, context), lambda x: x, raw)
    banned = jnp.where(s.banned_token_ids >= 0, s.banned_token_ids, vocab)
    logits = logits.at[jnp.arange(rows)[:, None], banned].set(-jnp.inf, mode="drop")
    greedy = argmax(logits)

    def sampled(logits):
        temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)
        filtered = filter_logits(logits / temperature[:, None], s)
        tokens = draw(filtered, jax.vmap(_uniforms)(s.seeds, s.context_lens))
        return jnp.where(s.temperature > 0, tokens, greedy)

    tokens = jax.lax.cond(s.use_random != 0, sampled, lambda _: greedy, logits)

    def with_logprobs(raw):
        logprobs = jax.nn.log_softmax(raw, axis=-1)
        top_lp, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, vocab))
        token_lp = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        return token_lp, top_ids.astype(jnp.int32), top_lp

    def without(raw):
        n = min(MAX_LOGPROBS, vocab)
        return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, n), jnp.int32),
                jnp.zeros((rows, n), jnp.float32))

    token_lp, top_ids, top_lp = jax.lax.cond(s.use_logprobs != 0, with_logprobs, without, raw)
    return SampleOutput(tokens, token_lp, top_ids, top_lp)

"""On-device sampling with per-row parameters (same semantics as backends/sampler.py).

Order: logprobs from the raw logits; repetition / frequency / presence penalties; banned ids;
then greedy (temperature 0) or temperature, top-k, top-p, min-p and a Gumbel-max draw keyed by
fold_in(PRNGKey(seed), context_len), so a row samples alike in any batch composition.
The costly parts (penalty counts, the vocabulary sort, the noise, log_softmax + top-N) sit behind
lax.cond on step flags computed on the host: a greedy batch without penalties or logprobs pays
for an argmax only, with one compiled program per bucket.
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
    use_sort: jax.Array  # some sampled row has top_k or top_p on


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


def _sort_filter(scaled: jax.Array, s: SamplingInputs) -> jax.Array:
    """top-k, top-p and min-p over the sorted row; ties keep the lower token id (stable sort)."""
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before the token
    keep &= (s.top_p[:, None] >= 1.0) | (before < s.top_p[:, None])
    keep &= probs >= s.min_p[:, None] * probs[:, :1]
    rows = jnp.arange(scaled.shape[0])[:, None]
    keep = jnp.zeros_like(keep).at[rows, order].set(keep)
    return jnp.where(keep, scaled, -jnp.inf)


def _min_p_filter(scaled: jax.Array, s: SamplingInputs) -> jax.Array:
    probs = jax.nn.softmax(scaled, axis=-1)
    keep = probs >= s.min_p[:, None] * probs.max(axis=-1, keepdims=True)
    return jnp.where(keep, scaled, -jnp.inf)


def _gumbel(seed: jax.Array, context_len: jax.Array, vocab: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), context_len)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def sample(logits: jax.Array, s: SamplingInputs, context: ContextFn) -> SampleOutput:
    """logits f32[S, V] -> one token per row (plus logprobs when the step asks for them)."""
    raw = logits.astype(jnp.float32)
    rows, vocab = raw.shape
    logits = jax.lax.cond(s.use_penalties != 0, lambda x: apply_penalties(x, s, context), lambda x: x, raw)
    banned = jnp.where(s.banned_token_ids >= 0, s.banned_token_ids, vocab)
    logits = logits.at[jnp.arange(rows)[:, None], banned].set(-jnp.inf, mode="drop")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)
        scaled = logits / temperature[:, None]
        scaled = jax.lax.cond(s.use_sort != 0, _sort_filter, _min_p_filter, scaled, s)
        noise = jax.vmap(_gumbel, in_axes=(0, 0, None))(s.seeds, s.context_lens, vocab)
        sampled = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
        return jnp.where(s.temperature > 0, sampled, greedy)

    tokens = jax.lax.cond(s.use_random != 0, draw, lambda _: greedy, logits)

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

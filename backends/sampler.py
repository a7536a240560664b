"""Host-side (numpy) sampler with the same semantics as the JAX on-device sampler.

Order: logprobs from the raw logits; penalties; banned ids; then greedy (temperature 0) or
temperature, top-k, top-p, min-p and an inverse-CDF draw with a uniform keyed by (seed, context length).
Top-k/top-p rank only the best CANDIDATES tokens of a row unless its top-k or nucleus needs more.
"""
from __future__ import annotations

import numpy as np

from nanovllm_jax.runner import SamplingBatch, StepOutput


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_penalties(logits: np.ndarray, sampling: SamplingBatch, contexts: list[np.ndarray]) -> np.ndarray:
    logits = logits.copy()
    vocab = logits.shape[-1]
    for row, context in enumerate(contexts):
        prompt_len = int(sampling.prompt_lens[row])
        seen = np.bincount(context, minlength=vocab)[:vocab] > 0
        output_counts = np.bincount(context[prompt_len:], minlength=vocab)[:vocab]
        rep = sampling.repetition_penalty[row]
        logits[row] = np.where(seen, np.where(logits[row] > 0, logits[row] / rep, logits[row] * rep), logits[row])
        logits[row] -= sampling.frequency_penalty[row] * output_counts
        logits[row] -= sampling.presence_penalty[row] * (output_counts > 0)
    return logits


CANDIDATES = 256


def _keep_ranked(probs: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Which of the ranked (descending) probabilities survive top-k, top-p and min-p."""
    keep = np.ones(len(probs), dtype=bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1.0:
        # keep a token if the mass strictly before it is below top_p (the top token always stays)
        keep &= (np.cumsum(probs) - probs) < top_p
    return keep & (probs >= min_p * probs[0])


def filter_logits(logits: np.ndarray, top_k: int, top_p: float, min_p: float,
                  candidates: int = CANDIDATES) -> np.ndarray:
    """Mask (to -inf) tokens outside top-k, the top-p nucleus and the min-p floor of one row;
    ties keep the lower token id."""
    unnormalized = np.exp(logits - logits.max())
    total = unnormalized.sum()
    if top_k <= 0 and top_p >= 1.0:
        return np.where(unnormalized >= min_p, logits, -np.inf)
    k = min(candidates, len(logits))
    order = np.argpartition(-logits, k - 1)[:k] if k < len(logits) else np.arange(len(logits))
    order = order[np.lexsort((order, -logits[order]))]  # by value, then lower id first
    probs = unnormalized[order] / total
    covered = 0 < top_k <= k or (top_p < 1.0 and probs.sum() >= top_p)
    if not covered:
        order = np.argsort(-logits, kind="stable")
        probs = unnormalized[order] / total
    kept = order[_keep_ranked(probs, top_k, top_p, min_p)]
    out = np.full_like(logits, -np.inf)
    out[kept] = logits[kept]
    return out


def draw(logits: np.ndarray, uniform: float) -> int:
    """A token from softmax(logits) by inverse CDF at `uniform` in [0, 1).

    Always an id of the row: where no weight is positive and finite (every logit -inf, or a NaN)
    there is no distribution to draw from, and the row's argmax stands in."""
    cumulative = np.cumsum(np.exp(logits - logits.max()), dtype=np.float64)
    if not 0.0 < cumulative[-1] < np.inf:
        return int(np.argmax(logits))
    target = min(uniform * cumulative[-1], np.nextafter(cumulative[-1], 0.0))  # never past the last kept token
    return int(np.searchsorted(cumulative, target, side="right"))


def uniform(seed: int, context_len: int) -> float:
    return float(np.random.default_rng([int(seed), int(context_len)]).random())


def sample(
    logits: np.ndarray,
    sampling: SamplingBatch,
    context_lens: np.ndarray,
    contexts: list[np.ndarray] | None = None,
) -> StepOutput:
    """Sample one token per row of f32 `logits` [S, V]; `contexts` (token ids per row) feed the penalties."""
    raw = logits = logits.astype(np.float32)
    if sampling.needs_penalties:
        assert contexts is not None, "penalties need each row's context tokens"
        logits = apply_penalties(logits, sampling, contexts)
    banned = sampling.banned_token_ids
    rows, cols = np.nonzero(banned >= 0)
    logits[rows, banned[rows, cols]] = -np.inf

    tokens = np.empty(logits.shape[0], dtype=np.int32)
    for row in range(logits.shape[0]):
        temperature = float(sampling.temperature[row])
        if temperature == 0.0:
            tokens[row] = int(np.argmax(logits[row]))
            continue
        filtered = filter_logits(
            logits[row] / temperature, int(sampling.top_k[row]), float(sampling.top_p[row]), float(sampling.min_p[row])
        )
        tokens[row] = draw(filtered, uniform(sampling.seeds[row], context_lens[row]))

    if sampling.num_logprobs == 0:
        return StepOutput(token_ids=tokens)
    n = sampling.num_logprobs
    raw_logprobs = log_softmax(raw)
    top = np.argpartition(-raw_logprobs, n - 1, axis=-1)[:, :n] if n < raw.shape[1] else np.tile(np.arange(n), (len(raw), 1))
    top_lp = np.take_along_axis(raw_logprobs, top, axis=-1)
    top = np.take_along_axis(top, np.lexsort((top, -top_lp), axis=-1), axis=-1).astype(np.int32)  # by value, then id
    return StepOutput(
        token_ids=tokens,
        logprobs=np.take_along_axis(raw_logprobs, tokens[:, None].astype(np.int64), axis=-1)[:, 0],
        top_token_ids=top,
        top_logprobs=np.take_along_axis(raw_logprobs, top.astype(np.int64), axis=-1),
    )

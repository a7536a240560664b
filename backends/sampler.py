"""Host-side (numpy) sampler with the same semantics as the JAX on-device sampler.

Order: logprobs from the raw logits; penalties; banned ids; then greedy (temperature 0) or, as
vLLM's v1 sampler: temperature, min-p, top-k, then top-p over the distribution that min-p and top-k
kept, renormalized; then an inverse-CDF draw with a uniform keyed by (seed, context length). A row
holding a NaN or +inf has no distribution: its argmax stands in (the first NaN, else the first +inf).
Top-k/top-p rank only the best CANDIDATES tokens of a row unless what min-p and top-k keep reaches
past them and either its top-k or its nucleus does.
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


def ranking(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k best logits of a row, by value, then lower id first (exactly k, whatever the
    ties at the k-th value); NaN ranks as -inf."""
    logits = np.where(np.isnan(logits), -np.inf, logits)
    n = len(logits)
    if k >= n:
        return np.argsort(-logits, kind="stable")
    kth = np.partition(logits, n - k)[n - k]  # the k-th greatest value
    above = np.flatnonzero(logits > kth)
    best = np.concatenate([above, np.flatnonzero(logits == kth)[: k - len(above)]])
    return best[np.lexsort((best, -logits[best]))]


def filter_logits(logits: np.ndarray, top_k: int, top_p: float, min_p: float,
                  candidates: int = CANDIDATES) -> np.ndarray:
    """Mask (to -inf) what vLLM's filters drop from one row of logits / temperature: min-p keeps the
    tokens whose probability is at least min_p times the top one's, top-k the first top_k of the
    ranking (value, then lower id), top-p the tokens of what those two kept whose renormalized mass
    ranked before them is below top_p (the top token always stays). Each keeps a prefix of the
    ranking.

    The ranking covers only the best `candidates` tokens unless what min-p and top-k keep reaches
    past them and either the top-k or the nucleus does too (then the whole row is sorted)."""
    weights = np.exp(logits - logits.max())  # p / p_max
    keep_min_p = weights >= min_p
    if top_k <= 0 and top_p >= 1.0:
        return np.where(keep_min_p, logits, -np.inf)
    k = min(candidates, len(logits))
    order = ranking(logits, k)
    in_top_k = (np.arange(k) < top_k) if top_k > 0 else np.ones(k, dtype=bool)
    kept_mass = weights[order][in_top_k & keep_min_p[order]].sum(dtype=np.float64)
    inside = 0 < top_k <= k or not keep_min_p[order[-1]] or k == len(logits)  # min-p and top-k end in it
    mass = kept_mass if inside else weights[keep_min_p].sum(dtype=np.float64)  # top-k off where not inside
    covered = (inside or top_k <= 0) and (top_p >= 1.0 or kept_mass >= top_p * mass)
    if not covered:  # the whole row: top-k past the candidates, or a wide nucleus
        order = ranking(logits, len(logits))
        in_top_k = (np.arange(len(order)) < top_k) if top_k > 0 else np.ones(len(order), dtype=bool)
        mass = weights[order][in_top_k & keep_min_p[order]].sum(dtype=np.float64)
    keep = in_top_k & keep_min_p[order]
    if top_p < 1.0:
        # keep a token while the kept weight strictly before it is below top_p of the kept weight
        ranked = weights[order].astype(np.float64)  # sums in float64: a float32 cumsum drifts
        keep &= (np.cumsum(ranked) - ranked) < top_p * mass
        keep[0] = True  # the top token always stays (min-p keeps it too)
    kept = order[keep]
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
    raw = logits.astype(np.float32)
    if sampling.needs_penalties:
        assert contexts is not None, "penalties need each row's context tokens"
        logits = apply_penalties(raw, sampling, contexts)
    else:
        logits = raw.copy()  # the banned ids below must not reach the logprobs
    banned = sampling.banned_token_ids
    rows, cols = np.nonzero(banned >= 0)
    logits[rows, banned[rows, cols]] = -np.inf

    tokens = np.empty(logits.shape[0], dtype=np.int32)
    for row in range(logits.shape[0]):
        temperature = float(sampling.temperature[row])
        scaled = logits[row] / temperature if temperature else logits[row]
        top = scaled.max()
        if temperature == 0.0 or np.isnan(top) or top == np.inf:
            tokens[row] = int(np.argmax(logits[row]))  # greedy; or no distribution: the first NaN, else +inf
            continue
        filtered = filter_logits(scaled, int(sampling.top_k[row]), float(sampling.top_p[row]), float(sampling.min_p[row]))
        tokens[row] = draw(filtered, uniform(sampling.seeds[row], context_lens[row]))

    if sampling.num_logprobs == 0:
        return StepOutput(token_ids=tokens)
    raw_logprobs = log_softmax(raw)
    n = min(sampling.num_logprobs, raw.shape[1])
    top = np.stack([ranking(row, n) for row in raw_logprobs]).astype(np.int32)
    token_logprobs = np.take_along_axis(raw_logprobs, tokens[:, None].astype(np.int64), axis=-1)[:, 0]
    return StepOutput(
        token_ids=tokens,
        logprobs=token_logprobs,
        ranks=(raw_logprobs >= token_logprobs[:, None]).sum(axis=-1).astype(np.int32),
        top_token_ids=top,
        top_logprobs=np.take_along_axis(raw_logprobs, top.astype(np.int64), axis=-1),
    )

"""Host-side (numpy) sampler with the same semantics as the JAX on-device sampler.

Order: logprobs from the raw logits; penalties; banned ids; then greedy (temperature 0) or
temperature, top-k, top-p, min-p and a Gumbel-max draw keyed by (seed, context length).
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


def filter_logits(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Mask (to -inf) tokens outside top-k, the top-p nucleus and the min-p floor of one row."""
    order = np.argsort(-logits, kind="stable")
    ranked = logits[order]
    keep = np.ones_like(ranked, dtype=bool)
    if top_k > 0:
        keep[top_k:] = False
    probs = np.exp(ranked - ranked[0])
    probs /= probs.sum()
    if top_p < 1.0:
        # keep a token if the mass strictly before it is below top_p (the top token always stays)
        keep &= (np.cumsum(probs) - probs) < top_p
    if min_p > 0.0:
        keep &= probs >= min_p * probs[0]
    out = np.full_like(logits, -np.inf)
    out[order[keep]] = logits[order[keep]]
    return out


def gumbel_noise(seed: int, context_len: int, vocab: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(context_len)]).gumbel(size=vocab).astype(np.float32)


def sample(
    logits: np.ndarray,
    sampling: SamplingBatch,
    context_lens: np.ndarray,
    contexts: list[np.ndarray] | None = None,
) -> StepOutput:
    """Sample one token per row of f32 `logits` [S, V]; `contexts` (token ids per row) feed the penalties."""
    logits = logits.astype(np.float32)
    raw_logprobs = log_softmax(logits)
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
        noise = gumbel_noise(sampling.seeds[row], context_lens[row], logits.shape[1])
        tokens[row] = int(np.argmax(filtered + noise))

    if sampling.num_logprobs == 0:
        return StepOutput(token_ids=tokens)
    n = sampling.num_logprobs
    top = np.argsort(-raw_logprobs, axis=-1, kind="stable")[:, :n].astype(np.int32)
    return StepOutput(
        token_ids=tokens,
        logprobs=np.take_along_axis(raw_logprobs, tokens[:, None].astype(np.int64), axis=-1)[:, 0],
        top_token_ids=top,
        top_logprobs=np.take_along_axis(raw_logprobs, top.astype(np.int64), axis=-1),
    )


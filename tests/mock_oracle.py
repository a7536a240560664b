"""What the mock model generates for one request, computed directly (no scheduler, no cache)."""
from __future__ import annotations

import numpy as np

from backends.mock.runner import mock_logits
from backends.sampler import sample
from nanovllm_jax.runner import SamplingBatch
from nanovllm_jax.sampling_params import SamplingParams


def one_row_sampling(params: SamplingParams, seed: int, prompt_len: int, banned: list[int],
                     vocab_size: int) -> SamplingBatch:
    return SamplingBatch(
        temperature=np.array([0.0 if params.greedy else params.temperature], np.float32),
        top_k=np.array([params.top_k if 0 < params.top_k < vocab_size else 0], np.int32),  # >= vocab: off
        top_p=np.array([params.top_p], np.float32),
        min_p=np.array([params.min_p], np.float32),
        seeds=np.array([seed], np.uint32),
        repetition_penalty=np.array([params.repetition_penalty], np.float32),
        presence_penalty=np.array([params.presence_penalty], np.float32),
        frequency_penalty=np.array([params.frequency_penalty], np.float32),
        prompt_lens=np.array([prompt_len], np.int32),
        banned_token_ids=np.array([banned or [-1]], np.int32),
        num_logprobs=0,
    )


def mock_generate(prompt: list[int], params: SamplingParams, vocab_size: int, eos_ids: set[int]) -> list[int]:
    """Greedy or explicitly seeded requests only (an unseeded one draws its seed from the engine)."""
    assert params.greedy or params.seed is not None
    context = list(prompt)
    out: list[int] = []
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
    while True:
        # below min_tokens the EOS ids are banned even with ignore_eos (as in vLLM)
        banned = sorted(set(params.stop_token_ids) | eos_ids) if len(out) < params.min_tokens else []
        ctx = np.array(context, np.int32)
        logits = mock_logits(ctx, vocab_size)[None]
        sampling = one_row_sampling(params, params.seed or 0, len(prompt), banned, vocab_size)
        token = int(sample(logits, sampling, np.array([len(context)]), [ctx]).token_ids[0])
        out.append(token)
        context.append(token)
        if len(out) >= params.min_tokens and token in stop_ids:
            return out
        if len(out) >= params.max_tokens:
            return out

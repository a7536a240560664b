"""A deterministic fake model behind the real runner contract.

Its "KV cache" holds token ids at the slots the scheduler assigns, and its logits come from a hash
of the context it reads back through the block table. So a wrong slot mapping, block table or
prefix-cache hit changes the output, and the mock checks the engine as a real model would.
"""
from __future__ import annotations

import numpy as np
import xxhash

from backends.sampler import sample
from nanovllm_jax.config import EngineConfig
from nanovllm_jax.runner import HostRunner, StepBatch, StepOutput, allocating_kv_cache, read_contexts

MOCK_MAX_MODEL_LEN = 2048  # its default
MOCK_MODEL_LEN_LIMIT = 1 << 20  # the most it takes: each step's block tables are max_model_len / block_size wide
MOCK_DEFAULT_MAX_BLOCKS = 1 << 20  # the default cache: every sequence at full length, up to this many blocks
LOGIT_SCALE = 4.0


def mock_logits(context: np.ndarray, vocab_size: int) -> np.ndarray:
    seed = xxhash.xxh3_64_intdigest(np.ascontiguousarray(context, dtype=np.int32).tobytes())
    return (np.random.default_rng(seed).standard_normal(vocab_size) * LOGIT_SCALE).astype(np.float32)


class MockRunner(HostRunner):
    def __init__(self, config: EngineConfig, vocab_size: int):
        if config.max_model_len is None:
            config.max_model_len = MOCK_MAX_MODEL_LEN
        config.finalize(model_max_len=MOCK_MODEL_LEN_LIMIT)
        self.block_size = config.kvcache_block_size
        self.vocab_size = vocab_size
        self.num_kvcache_blocks = config.num_kvcache_blocks or min(config.max_num_seqs * config.max_blocks_per_seq,
                                                                   MOCK_DEFAULT_MAX_BLOCKS)
        with allocating_kv_cache(self.num_kvcache_blocks, self.block_size, 4 * self.block_size):
            self.token_cache = np.full(self.num_kvcache_blocks * self.block_size, -1, dtype=np.int32)

    def execute(self, batch: StepBatch) -> StepOutput:
        self.token_cache[batch.slot_mapping] = batch.input_ids
        contexts = read_contexts(self.token_cache, batch, self.block_size)
        assert all((c >= 0).all() for c in contexts), "context reads a slot that was never written"
        logits = np.stack([mock_logits(c, self.vocab_size) for c in contexts])
        return sample(logits, batch.sampling, batch.context_lens, contexts)

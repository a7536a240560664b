from __future__ import annotations

from enum import Enum, auto

from nanovllm_jax.sampling_params import SamplingParams

PENDING = -1  # a token sampled by a step still in flight


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, how many of them have K/V in the cache, and its blocks."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 max_tokens: int):
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)  # ends with num_pending PENDING placeholders
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_pending = 0
        self.params = params
        self.seed = seed
        self.max_tokens = max_tokens  # params.max_tokens, or what max_model_len leaves when that is None
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its first admission
        self.num_preemptions = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the leading full computed blocks
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : self.num_known_tokens]

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Sampled tokens read back so far."""
        return self.num_known_tokens - self.num_prompt_tokens

    @property
    def num_sampled_tokens(self) -> int:
        """Sampled tokens, read back or still in flight."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_in_flight(self) -> bool:
        """The last token max_tokens allows is sampled and not yet read back: nothing more to compute."""
        return self.num_pending > 0 and self.num_sampled_tokens >= self.max_tokens

    def add_pending(self) -> None:
        self.token_ids.append(PENDING)
        self.num_pending += 1

    def fill_pending(self, token: int) -> None:
        """The oldest placeholder's token has been read back."""
        self.token_ids[self.num_known_tokens] = token
        self.num_pending -= 1

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def finish(self, reason: str) -> None:
        del self.token_ids[self.num_known_tokens :]  # tokens of steps in flight are dropped
        self.num_pending = 0
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

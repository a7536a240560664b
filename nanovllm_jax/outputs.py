from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """The sampled token's logprob and rank, and the top-N alternatives (token id -> logprob, ranks
    1..N in order). As in vLLM, of the model's raw logits (before temperature, penalties, filters and
    banned ids); rank is how many tokens have a logprob at least the sampled one's (1: the most likely)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    rank: int = field(default=0, kw_only=True)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort"; None while running
    logprobs: list[Logprob] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamDelta:
    """What one request gained in one step. `index` is its position in the prompts given."""

    index: int
    request_id: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    logprobs: list[Logprob] | None = None  # those of token_ids, where the request asked for logprobs

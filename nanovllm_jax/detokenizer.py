from __future__ import annotations

from nanovllm_jax.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes a growing token list into text without ever splitting a multi-byte character.

    Re-decodes only a short window: the tokens since `prefix_offset` give the context a tokenizer
    needs (leading spaces, byte fallback) and text is emitted only once it has no trailing U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids)
        self.prefix_offset = max(len(self.tokens) - 6, 0)
        self.read_offset = len(self.tokens)
        self.text = ""

    def add(self, token_id: int) -> str:
        return self.advance(*map(self.tokenizer.decode, self.push(token_id)))

    def push(self, token_id: int) -> tuple[list[int], list[int]]:
        """Append a token; returns the two windows whose text `advance` takes."""
        self.tokens.append(token_id)
        return self.tokens[self.prefix_offset : self.read_offset], self.tokens[self.prefix_offset :]

    def advance(self, prefix_text: str, full_text: str) -> str:
        """Emit what the newest token completed, given the decoded windows of `push`."""
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """At the end, emit whatever is left (an incomplete character decodes as U+FFFD)."""
        rest = self.tokenizer.decode(self.tokens[self.prefix_offset :])[
            len(self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])) :
        ]
        self.read_offset = len(self.tokens)
        self.text += rest
        return rest


def add_tokens(tokenizer: Tokenizer, new_tokens: list[tuple[IncrementalDetokenizer, int]]) -> None:
    """One new token for each detokenizer, with every window decoded in one batched call."""
    windows = [window for detokenizer, token in new_tokens for window in detokenizer.push(token)]
    texts = tokenizer.decode_batch(windows) if windows else []
    for i, (detokenizer, _) in enumerate(new_tokens):
        detokenizer.advance(texts[2 * i], texts[2 * i + 1])

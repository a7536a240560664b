from __future__ import annotations

from nanovllm_jax.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes a growing token list into text without ever splitting a multi-byte character.

    Re-decodes only a short window: the tokens since `prefix_offset` give the context a tokenizer
    needs (leading spaces, byte fallback) and text is emitted only once it has no trailing U+FFFD.
    Tokens without any text are left out of the window.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids)
        self.prefix_offset = max(len(self.tokens) - 6, 0)
        self.read_offset = len(self.tokens)
        self.text = ""
        self._prefix_text: str | None = None  # decode of tokens[prefix_offset:read_offset], once needed

    def add(self, token_id: int) -> str:
        self.tokens.append(token_id)
        prefix_text = self._prefix()
        full_text = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            if full_text == prefix_text and not self.tokenizer.decode([token_id, token_id]):
                # no text in any context (a skipped special token, an id past the vocabulary): kept in
                # the window, a run of them would make each decode longer than the last. Decoded twice, as
                # a decoder that strips the text's leading space (Llama 2's) makes a lone "▁" read as none
                self.tokens.pop()
            return ""
        new_text = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self._prefix_text = None
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """At the end, emit whatever is left (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._prefix()  # first: it may move the window's start
        rest = self.tokenizer.decode(self.tokens[self.prefix_offset :])[len(prefix_text) :]
        self.read_offset, self._prefix_text = len(self.tokens), None
        self.text += rest
        return rest

    def _prefix(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
            # A window starting inside a character (the prompt's last 6 tokens may) must start at its first
            # byte: byte fallback decodes a run of byte tokens that is not valid UTF-8 as a whole all as
            # U+FFFD, the new tokens' bytes too. A character has at most 3 more bytes.
            for _ in range(3):
                if self.prefix_offset == 0 or not self._prefix_text.startswith("\ufffd"):
                    break
                self.prefix_offset -= 1
                self._prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        return self._prefix_text

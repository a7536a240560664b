from __future__ import annotations

from nanovllm_jax.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes a growing token list into text without ever splitting a multi-byte character.

    Re-decodes only a short window: the tokens since `prefix_offset` give the context a tokenizer
    needs (leading spaces, byte fallback) and text is emitted only once it has no trailing U+FFFD.
    Tokens without any text are left out of the window. A prompt may end inside a character (token ids
    cut from an earlier output): the output's tokens that complete it make it output text, as in vLLM.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids)
        self.prefix_offset = max(len(self.tokens) - 6, 0)
        self.read_offset = self.prompt_len = len(self.tokens)
        self.text = ""
        self._prefix_text: str | None = None  # decode of tokens[prefix_offset:read_offset], once needed

    def add(self, token_id: int) -> str:
        self.tokens.append(token_id)
        prefix_text = self._prefix()
        full_text = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        if not full_text.endswith("\ufffd"):  # until then, byte fallback may decode it all as U+FFFDs
            prefix_text = self._unread_unfinished_character(prefix_text, full_text)
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
        full_text = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        rest = full_text[len(self._unread_unfinished_character(prefix_text, full_text)) :]
        self.read_offset, self._prefix_text = len(self.tokens), None
        self.text += rest
        return rest

    def _prefix(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode_prefix()
            # A window starting inside a character (the prompt's last 6 tokens may) must start at its first
            # byte: byte fallback decodes a run of byte tokens that is not valid UTF-8 as a whole all as
            # U+FFFD, the new tokens' bytes too. A character has at most 3 more bytes.
            for _ in range(3):
                if self.prefix_offset == 0 or not self._starts_inside_a_character():
                    break
                self.prefix_offset -= 1
                self._prefix_text = self._decode_prefix()
        return self._prefix_text

    def _decode_prefix(self) -> str:
        return self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])

    def _starts_inside_a_character(self) -> bool:
        # Not only the window's text starts with U+FFFD but also that of its first 1 to 4 tokens (a character
        # has at most 4 bytes): with byte fallback a prompt ending inside a character makes the whole run of
        # byte tokens before it decode as U+FFFDs, though the window starts at a character's first byte.
        if not self._prefix_text.startswith("\ufffd"):
            return False
        window = self.tokens[self.prefix_offset : self.read_offset]
        heads = (self.tokenizer.decode(window[:n]) for n in range(1, min(len(window), 5)))
        return not any(head and not head.startswith("\ufffd") for head in heads)  # "": a token without text

    def _unread_unfinished_character(self, prefix_text: str, full_text: str) -> str:
        """The prefix's text, less a character the prompt ends inside once the new tokens complete it."""
        pending = self.read_offset == self.prompt_len and prefix_text.endswith("\ufffd")
        if not pending or full_text.startswith(prefix_text):
            return prefix_text
        # Its bytes decoded as U+FFFD(s) at the prompt's end; decoded with the new tokens they are one
        # character. That character is output text, as vLLM's DecodeStream primed with the prompt emits it:
        # read from the end of the longest prompt text that the full text still starts with (a U+FFFD the
        # prompt holds as a character stays prompt text). Once per request, over the prompt's window.
        while self.read_offset > self.prefix_offset:
            self.read_offset -= 1
            self._prefix_text = self._decode_prefix()
            if full_text.startswith(self._prefix_text):
                break
        return self._prefix_text

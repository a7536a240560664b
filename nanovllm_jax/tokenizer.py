"""The tokenizer protocol and its one implementation over HF `tokenizers` (SimpleBPE included)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as _HFTokenizer

from nanovllm_jax.config import read_json_object, text_config_of


class Tokenizer(Protocol):
    eos_token_ids: list[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the protocol; EOS ids come from the model's configs."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token_ids: list[int], bos_token_id: int | None = None,
                 chat_template: str | None = None, skip_special_tokens: bool = True,
                 special_tokens: dict[str, str] | None = None):
        self._tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        # the strings a chat template may name (bos_token, eos_token, unk_token, pad_token, sep_token, ...), as
        # transformers passes them
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, ids in (("bos_token", [bos_token_id]), ("eos_token", self.eos_token_ids)):
            if ids and ids[0] is not None and 0 <= ids[0] < self.vocab_size:
                self.special_tokens.setdefault(name, tokenizer.id_to_token(ids[0]))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode()
        except UnicodeEncodeError as e:  # a lone surrogate, as from undecodable command-line bytes
            raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start}") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool | None = None) -> str:
        skip = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        return self._tok.decode(list(token_ids), skip_special_tokens=skip)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if not isinstance(self.chat_template, str):
            raise ValueError(f"the model's chat template is a {type(self.chat_template).__name__}, not a string")
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template  # lazy: heavy import

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt, **{"bos_token": "", **self.special_tokens},
            )
        except (TemplateError, TypeError) as e:  # a broken template, or one refusing the conversation
            raise ValueError(f"the model's chat template failed on this conversation: {e}") from None
        return rendered[0]


def load_tokenizer(model_dir: str | os.PathLike) -> HFTokenizer:
    """Load `tokenizer.json` from an HF model dir (falling back to transformers for other formats)."""
    model_dir = Path(model_dir)
    tok_file = model_dir / "tokenizer.json"
    if tok_file.exists():
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"cannot read {tok_file}: {e}") from None
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)._tokenizer
        except Exception as e:  # noqa: BLE001 - any failure means no usable tokenizer here
            raise ValueError(f"no usable tokenizer in {model_dir}: {e}") from e
        if tok.get_vocab_size(with_added_tokens=True) < 2:  # transformers' stand-in where no tokenizer files are
            raise ValueError(f"no usable tokenizer in {model_dir}: no tokenizer.json or other tokenizer files")
    eos, bos, template, special_tokens = _special_ids(model_dir, tok)
    return HFTokenizer(tok, eos, bos, template, special_tokens=special_tokens)


def _special_ids(model_dir: Path, tok: _HFTokenizer) -> tuple[list[int], int | None, str | None, dict[str, str]]:
    def read(name: str) -> dict:
        path = model_dir / name
        return read_json_object(path) if path.exists() else {}

    config, gen_config, tok_config = read("config.json"), read("generation_config.json"), read("tokenizer_config.json")
    eos: list[int] = []
    # As vLLM (through transformers' GenerationConfig): config.json's ids only where no generation_config.json is.
    eos_sources = [gen_config] if (model_dir / "generation_config.json").exists() else \
        [config, text_config_of(config, model_dir / "config.json")]
    for source in eos_sources:
        value = source.get("eos_token_id")
        ids = [] if value is None else [value] if isinstance(value, int) else value
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"eos_token_id in {model_dir} must be a token id or a list of them, got {value!r}")
        eos += [t for t in ids if t >= 0]  # -1: some configs' "none"
    if "added_tokens_decoder" not in tok_config:  # an older save: transformers takes the special tokens from here
        tok_config = tok_config | read("special_tokens_map.json")
    special_tokens = {}  # tokenizer_config's strings ("<eos>", or {"content": "<eos>", ...})
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = tok_config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special_tokens[name] = value
    eos_token = special_tokens.get("eos_token")
    if eos_token is not None and tok.token_to_id(eos_token) is not None:
        eos.append(tok.token_to_id(eos_token))
    bos = config.get("bos_token_id", gen_config.get("bos_token_id"))
    if not isinstance(bos, int) and "bos_token" in special_tokens:
        bos = tok.token_to_id(special_tokens["bos_token"])
    if isinstance(bos, bool) or isinstance(bos, int) and bos < 0:
        bos = None
    template = tok_config.get("chat_template")
    if (model_dir / "chat_template.jinja").exists():  # as in transformers, the file wins over tokenizer_config's
        template = (model_dir / "chat_template.jinja").read_text()
    elif isinstance(template, list):  # named templates, as transformers stores several: the default one
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return eos, bos if isinstance(bos, int) else None, template, special_tokens

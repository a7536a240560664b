"""A GGUF's embedded vocabulary -> a `tokenizers` tokenizer with the same ids as transformers' GGUF tokenizer.

The vocabulary-to-model step (sentencepiece-style BPE with merges rebuilt from the vocabulary, byte-level BPE,
Gemma's respelled space runs, control tokens kept whole) is transformers' own GGUF tokenizer conversion, so the
ids agree with `AutoTokenizer.from_pretrained(dir, gguf_file=...)` by construction (needing no torch), except
for byte-level control tokens outside the byte alphabet, which transformers splits and llama.cpp and HF's own
tokenizer.json keep whole (see _keep_control_tokens_whole), and for the space prefix of sentencepiece files, which
transformers adds once per text and llama.cpp before each run of text, or not at all (see _space_prefix_as_llama_cpp).
What that conversion leaves to the tokenizer class (BOS/EOS insertion, special-token names, the chat template) is
done here.
"""
from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer, processors

# tokenizer.ggml.* key -> the name transformers' converter expects in its tokenizer dict
_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}

# Gemma GGUFs converted from base checkpoints often carry no template; this is Gemma 3's turn format
# (a leading system message folded into the first user turn, assistant spoken as "model"), content
# given as a string or as a list of parts ({"type": "text", "text": ...} or {"type": "image"}).
GEMMA_CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content | trim }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set content = message['content'] %}"
    "{% set ns.system = (content if content is string else content[0]['text']) + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ render(message['content']) }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def has_vocab(metadata: dict[str, Any]) -> bool:
    return "tokenizer.ggml.tokens" in metadata and "tokenizer.ggml.model" in metadata


def build_tokenizer(architecture: str, metadata: dict[str, Any]) -> Tokenizer:
    """The `tokenizers` tokenizer the GGUF's vocabulary describes, BOS/EOS insertion included."""
    tokenizer_dict = {name: metadata[f"tokenizer.ggml.{key}"] for key, name in _TOKENIZER_KEYS.items()
                      if f"tokenizer.ggml.{key}" in metadata}
    tokenizer = _convert_with_transformers(architecture, tokenizer_dict)
    tokenizer = _keep_control_tokens_whole(_space_prefix_as_llama_cpp(tokenizer, metadata), metadata)
    tokenizer.post_processor = _special_token_template(metadata)
    return tokenizer


def _space_prefix_as_llama_cpp(tokenizer: Tokenizer, metadata: dict[str, Any]) -> Tokenizer:
    """transformers' sentencepiece conversion puts "▁" before the text with a Metaspace pre-tokenizer: once, at
    the very start, and not where the text already starts with a space. llama.cpp (like sentencepiece, and Llama 2's
    own tokenizer.json) puts a space before every run of text, the one after each special token too, and " hi"
    becomes "▁▁hi". A file with add_space_prefix = false wants none at all, nor a space stripped in decoding."""
    spec = json.loads(tokenizer.to_str())
    if (spec["pre_tokenizer"] or {}).get("type") != "Metaspace":
        return tokenizer
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        # a normalizer sees each run of text between added tokens on its own, as llama.cpp's fragments
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        spec["pre_tokenizer"] = None
    else:
        spec["pre_tokenizer"]["prepend_scheme"] = "never"
        if (spec["decoder"] or {}).get("type") == "Sequence":
            spec["decoder"]["decoders"] = [d for d in spec["decoder"]["decoders"] if d["type"] != "Strip"]
    return Tokenizer.from_str(json.dumps(spec))


CONTROL = 3  # llama.cpp's token type of a control token


def _keep_control_tokens_whole(tokenizer: Tokenizer, metadata: dict[str, Any]) -> Tokenizer:
    """Byte-level conversion respells every vocabulary entry into the byte alphabet and leaves out of
    the added tokens the control tokens whose text is not byte-level (DeepSeek's `<｜User｜>`), so their
    text was split into bytes. llama.cpp keeps control tokens whole, as HF's own tokenizer.json does:
    they get their raw text back and become special added tokens at their ids."""
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type", [])
    added = tokenizer.get_added_tokens_decoder()
    respelled = [i for i, kind in enumerate(types) if kind == CONTROL and i not in added
                 and tokenizer.id_to_token(i) not in (None, tokens[i]) and tokenizer.token_to_id(tokens[i]) is None]
    if not respelled:
        return tokenizer
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in respelled:
        del vocab[tokenizer.id_to_token(i)]
        vocab[tokens[i]] = i
        spec["added_tokens"].append(dict(id=i, content=tokens[i], single_word=False, lstrip=False, rstrip=False,
                                         normalized=False, special=True))
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_config(architecture: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """`tokenizer_config.json`: special-token names, BOS/EOS flags and the chat template."""
    tokens = metadata["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "add_bos_token": _adds_bos(metadata), "add_eos_token": _adds_eos(metadata)}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    template = metadata.get("tokenizer.chat_template")
    if template is None and architecture.startswith("gemma") and "<start_of_turn>" in tokens:
        template = GEMMA_CHAT_TEMPLATE
    if template is not None:
        config["chat_template"] = template
    return config


# byte-level pre-tokenizers for which llama.cpp adds BOS when the file has no add_bos_token (llama-vocab.cpp):
# Llama 3's early GGUFs, for one, carry no flag
_BOS_BY_DEFAULT_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                       "tekken", "chameleon"}


def _adds_bos(metadata: dict[str, Any]) -> bool:
    # llama.cpp adds BOS to a sentencepiece ("llama") vocabulary unless the file says otherwise, and to byte-level
    # ("gpt2") ones of the pre-tokenizers above
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    default = model == "llama" or (model == "gpt2" and pre in _BOS_BY_DEFAULT_PRE)
    return bool(metadata.get("tokenizer.ggml.add_bos_token", default)) and "tokenizer.ggml.bos_token_id" in metadata


def _adds_eos(metadata: dict[str, Any]) -> bool:
    return bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and "tokenizer.ggml.eos_token_id" in metadata


def _special_token_template(metadata: dict[str, Any]) -> processors.TemplateProcessing:
    tokens = metadata["tokenizer.ggml.tokens"]
    specials: list[tuple[str, int]] = []
    if _adds_bos(metadata):
        bos = metadata["tokenizer.ggml.bos_token_id"]
        specials.append((tokens[bos], bos))
    prefix = [specials[0][0]] if specials else []
    suffix: list[str] = []
    if _adds_eos(metadata):
        eos = metadata["tokenizer.ggml.eos_token_id"]
        specials.append((tokens[eos], eos))
        suffix = [tokens[eos]]
    single = [*prefix, "$A:0", *suffix]
    pair = [*single, *[f"{t}:1" for t in prefix], "$B:1", *[f"{t}:1" for t in suffix]]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _convert_with_transformers(architecture: str, tokenizer_dict: dict[str, Any]) -> Tokenizer:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return tokenizer

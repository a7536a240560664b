"""Tiny random HF models written as GGUF files the way llama.cpp's convert_hf_to_gguf lays them out.

Names come from gguf-py's own tensor-name map (the table llama.cpp uses), llama's Q/K rows get llama.cpp's rotary
permutation and Gemma's norms are stored as (1 + w); weights are quantized per tensor with gguf.quants.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

# HF leaf -> storage type; a spread of what llama.cpp quantizations mix, all quantizable by gguf-py
QTYPES = {
    "embed_tokens": Q.Q8_0, "lm_head": Q.F16,
    "q_proj": Q.Q8_0, "k_proj": Q.Q5_0, "v_proj": Q.Q4_0, "o_proj": Q.F16,
    "gate_proj": Q.BF16, "up_proj": Q.Q8_0, "down_proj": Q.Q4_1,
}
# the largest rounding error of each type, as a fraction of the tensor's largest magnitude
QUANT_REL_ERROR = {Q.F32: 2e-6, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 127, Q.Q5_0: 1 / 15, Q.Q4_0: 1 / 7,
                   Q.Q4_1: 1 / 7}

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
             "gemma3_text": gguf.MODEL_ARCH.GEMMA3}


def tiny_config(model_type: str, vocab_size: int):
    """A small config of each architecture; shapes are multiples of 32 so every tensor quantizes."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    if model_type == "llama":
        return LlamaConfig(**common, num_hidden_layers=2, num_key_value_heads=2, rope_theta=50000.0,
                           tie_word_embeddings=False)
    if model_type == "qwen2":
        return Qwen2Config(**common, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True)
    if model_type == "qwen3":
        # head_dim 128 (not hidden/heads): transformers' GGUF config ignores key_length and assumes Qwen3's 128
        return Qwen3Config(**common, num_hidden_layers=2, num_key_value_heads=2, head_dim=128,
                           tie_word_embeddings=False)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**common, num_hidden_layers=6, num_key_value_heads=1, head_dim=32,
                                query_pre_attn_scalar=32, sliding_window=16, tie_word_embeddings=True)
    raise ValueError(model_type)


def random_state_dict(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A transformers model's state dict with every tensor (norms and biases too) random, as float32 numpy."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.05, tuple(t.shape)).astype(np.float32)
            for name, t in model.state_dict().items() if not (config.tie_word_embeddings and name == "lm_head.weight")}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleave each head's two rotary halves row-wise."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def storage_type(hf_name: str) -> Q:
    if hf_name.endswith(".bias") or "norm" in hf_name:
        return Q.F32
    return next((q for leaf, q in QTYPES.items() if f"{leaf}." in hf_name), Q.F32)


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float = 1.0, high: float = 4.0,
                        original_context: int = 8192) -> np.ndarray:
    """The `rope_freqs` table llama.cpp writes for a Llama 3.x RoPE scaling (its generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * np.pi / freqs
    smooth = (original_context / wavelen - low) / (high - low)
    table = np.where(wavelen < original_context / high, 1.0,
                     np.where(wavelen > original_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return table.astype(np.float32)


def write_gguf(path: Path, config, state_dict: dict[str, np.ndarray], vocab: "Vocab",
               extra: dict[str, np.ndarray] | None = None) -> Path:
    model_type = config.model_type
    arch = GGUF_ARCH[model_type]
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_hparams(writer, config)
    vocab.write(writer)
    for hf_name, w in state_dict.items():
        stem, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(stem) + "." + suffix
        if model_type == "llama" and stem.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        if model_type == "gemma3_text" and hf_name.endswith("norm.weight"):
            w = w + 1.0
        qtype = storage_type(hf_name)
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_hparams(writer: gguf.GGUFWriter, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"]
    writer.add_rope_freq_base(theta)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if config.model_type in ("qwen3", "gemma3_text"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config.model_type == "gemma3_text":
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)


class Vocab:
    """A small sentencepiece-style ("llama") or byte-level ("gpt2") vocabulary to embed in a GGUF."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "llama":
            specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
            pieces = [f"<0x{b:02X}>" for b in range(256)]
            words = ["▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁w", "or", "▁is", "on", "at"]
            self.tokens = specials + pieces + words
            self.types = [3] * 4 + [6] * 256 + [1] * len(words)  # control, byte, normal
            self.scores = [0.0] * 260 + [-float(i) for i in range(len(words))]
            self.merges = None
            self.bos, self.eos, self.unk, self.pad = 2, 1, 3, 0
        else:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            alphabet = list(bytes_to_unicode().values())
            merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġ", "Ġ")]
            self.tokens = alphabet + ["".join(m) for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            self.types = [1] * (len(self.tokens) - 3) + [3, 3, 3]
            self.scores = None
            self.merges = [" ".join(m) for m in merges]
            self.bos = self.eos = self.pad = len(self.tokens) - 3
            self.unk = None

    def __len__(self) -> int:
        return len(self.tokens)

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.kind)
        writer.add_tokenizer_pre("default" if self.kind == "llama" else "qwen2")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos)
        writer.add_eos_token_id(self.eos)
        writer.add_pad_token_id(self.pad)
        if self.unk is not None:
            writer.add_unk_token_id(self.unk)
        writer.add_add_bos_token(self.kind == "llama")


def write_raw_gguf(path: Path, arch: str, tensors: list[tuple[str, np.ndarray, Q | None]],
                   uint16_fields: dict[str, int] | None = None) -> Path:
    """A minimal GGUF: an architecture name, a tiny vocab, the given (name, data, raw type) tensors and
    extra u16 metadata fields (e.g. a split's split.count)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for key, value in (uint16_fields or {}).items():
        writer.add_uint16(key, value)
    Vocab("llama").write(writer)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""Tiny random-weight HF checkpoints (Qwen3, Qwen2, Llama with llama3 RoPE scaling, Mistral with an
8-token sliding window) for parity tests.

Weights are drawn with a large initializer_range so greedy tokens are far from ties; each model dir
gets the mock's byte-level BPE as tokenizer.json (vocab 1024).
"""
from __future__ import annotations

import shutil
from pathlib import Path

COMMON = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
    initializer_range=0.2, bos_token_id=1, eos_token_id=0,
)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "qwen3": ("Qwen3", dict(COMMON, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2": ("Qwen2", dict(COMMON, tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3": ("Llama", dict(COMMON, tie_word_embeddings=False, num_key_value_heads=1, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), rope_theta=500000.0)),
    "mistral": ("Mistral", dict(COMMON, tie_word_embeddings=False, sliding_window=8, rope_theta=10000.0)),
}


def build_tiny_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random `name` model (f32 safetensors + config + tokenizer) into out_dir; returns it."""
    import torch
    import transformers

    family, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms start at 1; jitter them so a wrong norm weight mapping shows
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
            if pname.endswith("bias"):
                p.normal_(0.0, 0.2)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    from backends.mock import SIMPLE_BPE_PATH

    shutil.copy(SIMPLE_BPE_PATH, out_dir / "tokenizer.json")
    return out_dir


def load_reference(model_dir: Path):
    """The transformers model on the same weights, f32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return model


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation computed by transformers with its own KV cache."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def reference_logits(model, token_ids: list[int]):
    """f32 numpy logits [len, vocab] of a full forward over token_ids."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float().numpy()


def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Build every tiny model once into a session temp dir (call from a session-scoped fixture)."""
    root = tmp_path_factory.mktemp("tiny_hf_models")
    return {name: build_tiny_model(name, root / name) for name in TINY_CONFIGS}


def gemma3_conditional_model(text_config: dict):
    """A random Gemma3ForConditionalGeneration (tiny vision tower) around `text_config`, seeded; eval mode."""
    import torch
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=1000, boi_token_index=1001, eoi_token_index=1002)
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(config).eval()

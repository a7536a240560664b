"""Gemma 3 (text) on the JAX backend vs transformers.

A tiny random Gemma 3 with a 16-token sliding window (prompts longer than it): the forward's logits
against transformers' (prefill, chunked prefill over the paged cache, decode; several sequences in a
step), and greedy tokens through the engine with prefix caching, preemption and chunked prefill forced.
Then the packaged Gemma 3 270M: greedy tokens of `LLM()` equal transformers loading the same GGUF.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from hf_models import gemma3_conditional_model
from nanovllm_jax import LLM, SamplingParams
from nanovllm_jax.models import ForwardInputs
from nanovllm_jax.layers.attention import AttentionMetadata

import torch
import transformers

WINDOW = 16
BLOCK = 8
TINY = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
    initializer_range=0.2, bos_token_id=1, eos_token_id=0, pad_token_id=0,
    sliding_window=WINDOW, query_pre_attn_scalar=24,  # != head_dim, so a wrong scale shows
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                     "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}},
    final_logit_softcapping=30.0,
    attn_logit_softcapping=1.0,  # transformers ignores it for Gemma 3; so must we
)


def _jitter_norms(model) -> None:
    """Gemma norms start at w = 0 (scale 1 + w); jitter them so a wrong norm mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, transformers model) of a random Gemma3ForCausalLM with the mock's BPE tokenizer."""
    from backends.mock import SIMPLE_BPE_PATH

    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY)).eval()
    _jitter_norms(model)
    out = tmp_path_factory.mktemp("gemma3_tiny")
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(SIMPLE_BPE_PATH, out / "tokenizer.json")
    return out, model


def _prompts(n: int = 4, seed: int = 1) -> list[list[int]]:
    """Prompts of 20-60 tokens (longer than the window); the first two share a 24-token prefix."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 1000, 24).tolist()  # (1000+ are the image tokens of the multimodal test)
    prompts = [rng.integers(3, 1000, k).tolist() for k in (20, 41, 60, 33, 52, 27)]
    prompts[0] = prefix + prompts[0][:12]
    prompts[1] = prefix + prompts[1][:30]
    return prompts[:n]


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# ---------------------------------------------------------------- the forward on hand-built steps

class _Paged:
    """A paged cache and per-sequence block tables, driven one step (a list of (seq, new ids)) at a time."""

    def __init__(self, model_dir: Path, stacked: bool = True, num_blocks: int = 64, width: int = 16,
                 pages_per_chunk: int = 2):
        import jax
        import jax.numpy as jnp

        from nanovllm_jax.loader import load_model

        module, self.cfg, self.params = load_model(model_dir, "float32", stacked=stacked)
        self.forward = jax.jit(module.forward, static_argnums=4, donate_argnums=(1, 2))
        self.num_slots = num_blocks * BLOCK
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, self.num_slots, self.cfg.head_dim)
        self.k = jnp.zeros(shape, jnp.float32)
        self.v = jnp.zeros(shape, jnp.float32)
        self.width, self.ppc = width, pages_per_chunk
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        # Blocks handed out in a scrambled order so a wrong block-table lookup shows.
        self.free = list(np.random.default_rng(0).permutation(np.arange(1, num_blocks)))

    def step(self, work: list[tuple[int, list[int]]], pad_to: int = 64) -> list[np.ndarray]:
        """Run each seq's new tokens in one flat batch (padded to `pad_to` tokens: one compiled shape);
        returns each new token's logits per seq."""
        import jax.numpy as jnp

        ids, pos, slots, seq_ids, cached, tables = [], [], [], [], [], []
        for row, (seq, new) in enumerate(work):
            start = self.lens.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < start + len(new):
                table.append(int(self.free.pop()))
            padded = table + [0] * (self.width - len(table))
            for i, token in enumerate(new):
                p = start + i
                ids.append(token)
                pos.append(p)
                slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
                seq_ids.append(row)
                cached.append(start)
                tables.append(padded)
            self.lens[seq] = start + len(new)
        n = len(ids)
        pad = pad_to - n  # padding tokens: no sequence, and a slot out of range (the scatter drops it)
        ids, pos, seq_ids, cached = ids + [0] * pad, pos + [0] * pad, seq_ids + [-1] * pad, cached + [0] * pad
        slots, tables = slots + [self.num_slots] * pad, tables + [[0] * self.width] * pad
        i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))  # noqa: E731
        meta = AttentionMetadata(i32(pos), i32(seq_ids), i32(cached), i32(tables), BLOCK, self.ppc)
        inputs = ForwardInputs(i32(ids), i32(slots), i32(np.arange(pad_to)), meta)
        logits, self.k, self.v = self.forward(self.params, self.k, self.v, inputs, self.cfg)
        logits = np.asarray(logits)[:n]
        bounds = np.cumsum([0] + [len(new) for _, new in work])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("stacked", [True, False], ids=["scan", "unrolled"])
def test_prefill_chunked_prefill_and_decode_logits_match_transformers(tiny, stacked):
    model_dir, model = tiny
    a, b, c = _prompts(3)
    full = {0: a + [5, 6, 7, 8], 1: b + [9, 10, 11], 2: c + [12, 13]}
    ref = {s: _logits(model, ids) for s, ids in full.items()}
    paged = _Paged(model_dir, stacked)
    got: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}

    def record(work):
        for (seq, _), out in zip(work, paged.step(work)):
            got[seq].append(out)

    # seq 0 prefills whole; seq 1 in chunks of 19 + rest (the second reads the cache past the window);
    # seq 2 in chunks of 7, 9, rest, batched with the others' decode steps.
    record([(0, a), (1, b[:19]), (2, c[:7])])
    record([(1, b[19:]), (2, c[7:16])])
    record([(2, c[16:]), (0, [5]), (1, [9])])
    record([(0, [6]), (1, [10]), (2, [12])])
    record([(0, [7]), (1, [11]), (2, [13])])
    record([(0, [8])])
    errs = []
    for seq in full:
        ours = np.concatenate(got[seq])
        assert ours.shape == ref[seq].shape
        errs.append(_rel_err(ours, ref[seq]))
    assert max(errs) < 1e-4, errs


def test_config_forms_agree():
    """transformers 4.x field names and the multimodal text_config parse like 5.x's rope_parameters."""
    from nanovllm_jax.models import gemma3

    v5 = gemma3.parse_config(transformers.Gemma3TextConfig(**TINY).to_dict())
    v4 = dict(TINY, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
              rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window_pattern=3)
    del v4["rope_parameters"], v4["layer_types"]
    assert gemma3.parse_config(v4) == v5
    multimodal = gemma3.parse_config({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": v4})
    assert multimodal == dataclasses.replace(v5, final_logit_softcapping=None)  # as transformers ignores it
    defaults = gemma3.parse_config({"text_config": {"num_hidden_layers": 12}})  # hub configs store overrides
    assert defaults.sliding_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert (defaults.sliding_window, defaults.vocab_size, defaults.query_pre_attn_scalar) == (4096, 262_208, 256)
    with pytest.raises(ValueError, match="hidden_activation"):
        gemma3.parse_config(dict(TINY, hidden_activation="silu"))


def test_float16_is_refused(tiny):
    """As in vLLM, Gemma 3 does not run in float16: its residual stream outgrows the range (the packaged
    270M passes 1e5 by layer 8), and every logit came out NaN, so greedy decoding emitted token 0
    (the pad) with NaN logprobs, as transformers' float16 gives NaN too. bfloat16 loads."""
    from nanovllm_jax.loader import load_model

    model_dir, _ = tiny
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        load_model(model_dir, "float16")
    with pytest.raises(ValueError, match="float16"):
        LLM(str(model_dir), backend="jax", dtype="float16")
    _, _, params = load_model(model_dir, "bfloat16")
    assert params["embed"].dtype == "bfloat16"


def test_conditional_generation_text_decoder_matches_transformers(tmp_path):
    """Gemma3ForConditionalGeneration checkpoints load their text decoder (text-only prompts)."""
    text = {k: v for k, v in TINY.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = gemma3_conditional_model(text)
    _jitter_norms(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = _prompts(1)[0]
    ref = _logits(model, ids)
    ours = np.concatenate(_Paged(tmp_path).step([(0, ids)]))
    assert _rel_err(ours, ref) < 1e-4


# ---------------------------------------------------------------- greedy tokens through the engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
ENGINE = dict(backend="jax", kvcache_block_size=BLOCK, max_model_len=128)


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    _, model = tiny
    return {tuple(p): _greedy(model, p, 32) for p in _prompts(4)}


def _check(llm: LLM, prompts: list[list[int]], reference: dict) -> list:
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference[tuple(prompt)], prompt
    return outputs


def test_greedy_default_engine(tiny, tiny_reference):
    _check(LLM(str(tiny[0]), **ENGINE), _prompts(4), tiny_reference)


def test_greedy_with_prefix_cache_hits(tiny, tiny_reference):
    llm = LLM(str(tiny[0]), enable_prefix_caching=True, **ENGINE)
    prompts = _prompts(4)
    _check(llm, prompts[0::2], tiny_reference)
    # The shared 24-token prefix (three full blocks) now sits in the cache; prompt 1 reuses it.
    outputs = _check(llm, prompts[1::2], tiny_reference)
    assert outputs[0].num_cached_tokens == 24
    assert llm.engine.scheduler.block_manager.prefix_hit_tokens > 0


def test_greedy_under_preemption(tiny, tiny_reference):
    # 4 sequences need 9-12 blocks each (fewer bucket programs to compile, too)
    llm = LLM(str(tiny[0]), num_kvcache_blocks=20, max_num_batched_tokens=16, **ENGINE)
    _check(llm, _prompts(4), tiny_reference)
    assert llm.engine.scheduler.num_preemptions > 0


def test_greedy_with_chunked_prefill(tiny, tiny_reference):
    llm = LLM(str(tiny[0]), max_num_batched_tokens=16, **ENGINE)  # every prompt takes 2-4 steps
    _check(llm, _prompts(4), tiny_reference)


# ---------------------------------------------------------------- the packaged Gemma 3 270M

# Two groups of equal token length (9 and 16 with BOS): the reference runs each group as one batch with no
# padding, since a decode step of this model on CPU is bound by reading its 670 MB embedding table.
REAL_PROMPTS = [
    "Photosynthesis is the process by which plants",
    "The first president of the United States was",
    "In machine learning, a neural network is",
    "A haiku about autumn leaves:\n",
    "Once upon a time, in a small village by the sea, there lived",
    "#include <stdio.h>\n\nint main(void) {\n",
]


@pytest.fixture(scope="session")
def real_reference() -> dict[tuple[int, ...], list[int]]:
    """prompt ids -> greedy tokens of transformers on the packaged GGUF (dequantized by transformers, f32)."""
    from nanovllm_jax.default_model import default_gguf_path, default_model_path
    from nanovllm_jax.tokenizer import load_tokenizer

    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    # Our GGUF tokenizer (its ids equal transformers' on a mixed corpus: test_gguf.py); loading
    # transformers' from the GGUF would cost another 20 s.
    tokenizer = load_tokenizer(default_model_path())
    groups: dict[int, list[list[int]]] = {}
    for text in REAL_PROMPTS:
        ids = tokenizer.encode(text)
        groups.setdefault(len(ids), []).append(ids)
    reference = {}
    for batch in groups.values():
        with torch.no_grad():
            out = model.generate(torch.tensor(batch), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        reference |= {tuple(ids): row[len(ids):].tolist() for ids, row in zip(batch, out)}
    return reference


def test_packaged_model_greedy_equals_transformers_gguf(real_reference):
    # 16-token steps: fewer programs to compile (18 unrolled layers on CPU), and chunked prefill too.
    llm = LLM(backend="jax", dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=16)
    outputs = llm.generate(REAL_PROMPTS, GREEDY, use_tqdm=False)
    assert {tuple(out.prompt_token_ids) for out in outputs} == set(real_reference)
    for out in outputs:
        assert out.token_ids == real_reference[tuple(out.prompt_token_ids)], out.prompt

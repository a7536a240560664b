"""config.json forms and checkpoint contents that change what transformers computes: both backends match it.

Each case writes a raw config.json (as a hub checkpoint or a hand edit might hold it, not transformers'
re-serialized form), random weights of the shapes transformers builds from it, and compares the JAX
backend's logits (prefill and a cached chunk) and the ONNX backend's greedy tokens with transformers'
(f32). A config neither backend can run exactly must instead be a ValueError naming the field.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from nanovllm_jax import LLM, SamplingParams
from test_jax_model import PagedModel, rel_err

BASE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.2,
            bos_token_id=1, eos_token_id=0)
LLAMA = dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=10000.0)
IDS = np.random.default_rng(1).integers(2, 1024, 40).tolist()


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "onnx_cache"))


def build(out: Path, raw: dict, edit_tensors=None) -> Path:
    """config.json = raw verbatim; weights of the model transformers builds from it (seeded, norms and biases
    jittered); edit_tensors(dict of numpy tensors) may change the checkpoint afterwards."""
    from backends.mock import SIMPLE_BPE_PATH
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(out))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2) if raw["model_type"].startswith("gemma3") else p.mul_(1.0 + 0.2 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(raw))  # the raw form, not transformers' normalized one
    if edit_tensors is not None:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(SIMPLE_BPE_PATH, out / "tokenizer.json")
    return out


def _jax_logits(model_dir: Path, stacked: bool) -> np.ndarray:
    model = PagedModel(model_dir, stacked=stacked, num_seqs=1)
    return np.concatenate([model.step({0: IDS[:20]})[0], model.step({0: IDS[20:]})[0]])


def assert_backends_match_transformers(model_dir: Path, onnx: bool = True) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0].numpy()
    got = _jax_logits(model_dir, stacked=False)
    assert rel_err(got, expected) < 1e-4
    if onnx:  # greedy tokens and their top-20 logprobs, against transformers' full forward over the text
        prompt = IDS[:24]
        llm = LLM(str(model_dir), backend="onnx", max_model_len=128)
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=20),
                           use_tqdm=False)[0]
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:]
        assert out.token_ids == logits.argmax(-1).tolist()
        expected_lp = torch.log_softmax(logits, -1).numpy()
        for step, lp in enumerate(out.logprobs):
            ids = sorted(lp.top)
            np.testing.assert_allclose([lp.top[t] for t in ids], expected_lp[step, ids], atol=1e-3)
            assert set(ids) == set(np.argsort(-expected_lp[step])[:20].tolist())


@pytest.mark.parametrize("raw", [
    # rope_parameters' rope_theta wins over a top-level one
    dict(LLAMA, rope_theta=10.0, rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=1e6)),
    # a legacy rope_scaling replaces rope_parameters whole, its rope_theta included (the default 10000 applies)
    dict({k: v for k, v in LLAMA.items() if k != "rope_theta"}, rope_scaling=dict(rope_type="linear", factor=4.0),
         rope_parameters=dict(rope_type="default", rope_theta=100.0)),
    # a top-level original_max_position_embeddings (as Phi-3 stores it) wins over the llama3 dict's
    dict(LLAMA, original_max_position_embeddings=16, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    # without one, llama3 scaling's pretraining length is max_position_embeddings
    dict(LLAMA, max_position_embeddings=128, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0)),
], ids=["theta_in_rope_parameters", "rope_scaling_replaces_rope_parameters", "top_level_original_max_position",
        "llama3_original_max_position_defaults_to_max_position"])
def test_llama_rope_fields_read_as_transformers_reads_them(tmp_path, raw):
    assert_backends_match_transformers(build(tmp_path / "model", raw))


GEMMA3 = dict(BASE, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=3, head_dim=16,
              query_pre_attn_scalar=24, sliding_window=8, hidden_activation="gelu_pytorch_tanh",
              tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
PER_LAYER_TYPE = {"full_attention": dict(rope_type="default", rope_theta=1e5),
                  "sliding_attention": dict(rope_type="default", rope_theta=100.0)}


@pytest.mark.parametrize("scaling", [dict(rope_type="linear", factor=4.0),  # llama3: its length defaults as Llama's
                                     dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)])
def test_gemma3_rope_scaling_updates_the_per_layer_type_rope_parameters(tmp_path, scaling):
    """transformers 5 applies a legacy rope_scaling to the full-attention layers' dict of rope_parameters."""
    raw = dict(GEMMA3, max_position_embeddings=128, rope_parameters=PER_LAYER_TYPE, rope_scaling=scaling)
    assert_backends_match_transformers(build(tmp_path / "model", raw))


@pytest.mark.parametrize("change, message", [
    # not keyed by layer type: transformers 5 ignores the dict (and 4.x rope_parameters altogether)
    (dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=1e5)), "rope_parameters"),
    # "type" where transformers 5 already holds rope_type "default": it ignores the linear scaling, 4.x applied it
    (dict(rope_scaling={"type": "linear", "factor": 8.0}), "rope_scaling.*type='linear'"),
])
def test_gemma3_rope_forms_transformers_versions_read_differently_are_refused(tmp_path, change, message):
    from backends.onnx.model_spec import read_spec

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(GEMMA3 | change))
    with pytest.raises(ValueError, match=message):
        PagedModel(model_dir, stacked=False)
    with pytest.raises(ValueError, match=message):
        read_spec(model_dir)


def _add_head(same: bool):
    def edit(tensors):
        embed = tensors["model.embed_tokens.weight"]
        rng = np.random.default_rng(5)
        tensors["lm_head.weight"] = embed.copy() if same else (0.2 * rng.standard_normal(embed.shape)).astype(np.float32)
    return edit


@pytest.mark.parametrize("raw", [dict(LLAMA, tie_word_embeddings=True), GEMMA3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("same", [False, True], ids=["other_head", "equal_head"])
def test_a_tied_config_whose_checkpoint_holds_another_head_uses_that_head(tmp_path, raw, same):
    """transformers 5 leaves embedding and head untied when both are stored with different values."""
    model_dir = build(tmp_path / "model", raw, edit_tensors=_add_head(same))
    assert_backends_match_transformers(model_dir)
    assert ("lm_head" in PagedModel(model_dir, stacked=True).params) == (not same)  # an equal copy is dropped


def _add_layer_tensors(*names_shapes):
    def edit(tensors):
        rng = np.random.default_rng(6)
        for i in range(BASE["num_hidden_layers"]):
            for name, shape in names_shapes:
                tensors[f"model.layers.{i}.{name}"] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return edit


@pytest.mark.parametrize("raw, edit", [
    # tensors the config does not call for: transformers ignores them (the ONNX exporter applied them)
    (LLAMA, _add_layer_tensors(("self_attn.o_proj.bias", (64,)), ("self_attn.q_proj.bias", (64,)))),
    (LLAMA, _add_layer_tensors(("self_attn.q_norm.weight", (16,)), ("self_attn.k_norm.weight", (16,)))),
    (dict(GEMMA3, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]),
     _add_layer_tensors(("self_attn.o_proj.bias", (64,)))),
    # attention_bias, which transformers' Qwen2 ignores (q/k/v biases always, no o bias): the JAX backend
    # looked for o_proj.bias
    (dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=True), None),
], ids=["llama_extra_biases", "llama_extra_qk_norms", "gemma3_extra_o_bias", "qwen2_attention_bias"])
def test_the_config_not_the_checkpoint_decides_the_optional_tensors(tmp_path, raw, edit):
    assert_backends_match_transformers(build(tmp_path / "model", raw, edit_tensors=edit))


@pytest.mark.parametrize("family", ["Llama", "Mistral", "Qwen2", "Qwen3"])
def test_fields_a_config_leaves_out_take_transformers_defaults(family):
    """Absent num_key_value_heads (Qwen: 32, Mistral: 8), head_dim (Qwen3: 128) and sliding_window (Mistral:
    4096, applied past 4096 tokens) were the fallbacks instead: a shape error, or for the window no error."""
    from nanovllm_jax.models import llama

    raw = dict(architectures=[f"{family}ForCausalLM"], model_type=family.lower(), vocab_size=1024, hidden_size=1024,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=32)
    ours, theirs = llama.parse_config(raw), transformers.AutoConfig.for_model(**raw)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads  # as modeling_*
    assert (ours.num_kv_heads, ours.head_dim) == (theirs.num_key_value_heads, head_dim)
    assert ours.layer_windows == (getattr(theirs, "sliding_window", None),) * 2
    assert (ours.rms_norm_eps, ours.rope_theta, ours.tie_word_embeddings) == (
        theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"], theirs.tie_word_embeddings)


def test_qwen3_without_head_dim(tmp_path):
    raw = {k: v for k, v in BASE.items()} | dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    assert_backends_match_transformers(build(tmp_path / "model", raw))


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Mistral"])
def test_a_config_without_model_type_is_its_architectures(tmp_path, family):
    """transformers' Qwen2ForCausalLM (& co.) loads such a config by class; the family's switches (Qwen2's
    biases, Qwen3's q/k norms, Mistral's window) were silently off."""
    raw = dict(BASE, architectures=[f"{family}ForCausalLM"], model_type=family.lower(), head_dim=16, sliding_window=8)
    model_dir = build(tmp_path / "model", raw)
    del raw["model_type"]
    (model_dir / "config.json").write_text(json.dumps(raw))
    ref = getattr(transformers, f"{family}ForCausalLM").from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0].numpy()
    got = _jax_logits(model_dir, stacked=False)
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("family, window", [("Qwen2", dict(max_window_layers=1)), ("Qwen3", dict(
    layer_types=["sliding_attention", "full_attention", "sliding_attention"]))])
def test_qwen_sliding_window_layers(tmp_path, family, window):
    """use_sliding_window: the layers from max_window_layers on (or those layer_types names) attend within the
    window, in transformers and vLLM; it was refused. Both backends, scanned layers and unrolled."""
    raw = dict(BASE, architectures=[f"{family}ForCausalLM"], model_type=family.lower(), head_dim=16,
               num_hidden_layers=3, use_sliding_window=True, sliding_window=8, **window)
    model_dir = build(tmp_path / "model", raw)
    assert_backends_match_transformers(model_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0].numpy()
    assert rel_err(_jax_logits(model_dir, stacked=True), expected) < 1e-4  # the window as per-layer data
    (model_dir / "config.json").write_text(json.dumps(raw | dict(use_sliding_window=False)))
    assert rel_err(_jax_logits(model_dir, stacked=True), expected) > 1e-2  # the window matters here


def test_mistral_runs_on_both_backends(tmp_path):
    raw = dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral", head_dim=16, sliding_window=8)
    assert_backends_match_transformers(build(tmp_path / "model", raw))


@pytest.mark.parametrize("window", [0, -1, "8", 8.0, [8]])
@pytest.mark.parametrize("raw", [dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral"),
                                 dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
                                      max_window_layers=0),
                                 dict(GEMMA3, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])],
                         ids=["mistral", "qwen2", "gemma3"])
def test_a_sliding_window_that_is_no_positive_integer_is_refused(raw, window):
    """It went into the attention mask as it was (transformers refuses it too)."""
    from nanovllm_jax.models import model_module

    with pytest.raises(ValueError, match="sliding_window must be a positive integer or null, got " + re.escape(repr(window))):
        model_module(raw).parse_config(raw | dict(sliding_window=window))

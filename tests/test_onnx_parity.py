"""ONNX backend greedy tokens == transformers on tiny random Qwen3 / Qwen2 / Llama / Gemma 3 checkpoints, in the
four engine settings (default, no prefix cache, forced preemption, forced chunked prefill)."""
from __future__ import annotations

import numpy as np
import pytest

from hf_models import gemma3_conditional_model
from nanovllm_jax import LLM, SamplingParams
from onnx_fixtures import TINY_CONFIGS, build_tiny_model, hf_greedy

NEW_TOKENS = 32
SETTINGS = {
    "default": {},
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "preemption": dict(num_kvcache_blocks=12),  # 6 prompts of up to 102 tokens need ~30 blocks at once
    "chunked_prefill": dict(max_num_batched_tokens=24),  # the 70-token prompt takes three chunks
}


def make_prompts() -> list[list[int]]:
    """Six prompts of different lengths; two share a 40-token (2.5-block) prefix."""
    rng = np.random.default_rng(1)
    ids = lambda n: rng.integers(3, 1024, n).tolist()  # noqa: E731 - skip the tokenizer's specials
    shared = ids(40)
    return [ids(5), ids(17), ids(70), shared + ids(8), shared + ids(20), ids(33)]


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path_factory.mktemp("onnx_cache")))
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """arch -> (model dir, prompts, transformers' greedy tokens)."""
    prompts = make_prompts()
    refs = {}
    for arch in TINY_CONFIGS:
        model_dir = build_tiny_model(arch, tmp_path_factory.mktemp(arch))
        refs[arch] = (model_dir, prompts, hf_greedy(model_dir, prompts, NEW_TOKENS))
    return refs


def onnx_greedy(model_dir, prompts, **engine_kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), backend="onnx", max_model_len=256, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_greedy_matches_transformers(reference, arch, setting):
    model_dir, prompts, expected = reference[arch]
    got, llm = onnx_greedy(model_dir, prompts, **SETTINGS[setting])
    assert got == expected
    bm, scheduler = llm.engine.block_manager, llm.engine.scheduler
    if setting == "default":  # run the prefix-sharing prompts again: now their full blocks are cached
        again = llm.generate(prompts[3:5], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                             use_tqdm=False)
        assert [o.token_ids for o in again] == expected[3:5]
        assert min(o.num_cached_tokens for o in again) >= 32
    if setting == "no_prefix_cache":
        assert bm.prefix_hit_tokens == 0
    if setting == "preemption":
        assert scheduler.num_preemptions > 0


def test_exported_dir_is_a_model_dir(reference):
    """An exported dir given as the model runs as is, with the tokenizer copied into it."""
    from backends.onnx.export import ensure_exported, is_exported_dir

    model_dir, prompts, expected = reference["qwen3"]
    exported = ensure_exported(model_dir)
    assert is_exported_dir(exported) and exported != model_dir
    assert ensure_exported(model_dir) == exported  # cached: the second call exports nothing
    got, llm = onnx_greedy(exported, prompts)
    assert got == expected
    assert llm.tokenizer.encode("hello") == LLM(backend="mock").tokenizer.encode("hello")


def test_logprobs_match_transformers(reference):
    """The first sampled token's logprobs equal transformers' log-softmax of the last prompt logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, prompts, _ = reference["qwen2"]
    llm = LLM(str(model_dir), backend="onnx", max_model_len=256)
    outs = llm.generate(prompts[:3], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5), use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt, out in zip(prompts[:3], outs):
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1).numpy()
        top = out.logprobs[0].top
        assert list(top) == np.argsort(-expected)[:5].tolist() and out.logprobs[0].token_id == list(top)[0]
        np.testing.assert_allclose(list(top.values()), expected[list(top)], atol=1e-4)


def test_seeded_sampling_and_penalties_are_batch_independent(reference):
    """A seeded request with penalties samples the same tokens alone and inside a batch."""
    model_dir, prompts, _ = reference["llama"]
    llm = LLM(str(model_dir), backend="onnx", max_model_len=256)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.2)
    alone = llm.generate(prompts[2], params, use_tqdm=False)[0].token_ids
    batched = llm.generate(prompts, [params if i == 2 else SamplingParams(max_tokens=8) for i in range(6)],
                           use_tqdm=False)[2].token_ids
    assert alone == batched and len(alone) == 16


@pytest.mark.parametrize("arch", TINY_CONFIGS)
def test_greedy_matches_jax_backend(reference, arch):
    """Both backends on the same checkpoint and engine settings give transformers' tokens."""
    model_dir, prompts, expected = reference[arch]
    small = dict(max_num_seqs=8, max_num_batched_tokens=128)  # few shape buckets: a short JAX warm-up
    onnx_tokens, _ = onnx_greedy(model_dir, prompts, **small)
    jax_llm = LLM(str(model_dir), backend="jax", max_model_len=256, **small)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert [o.token_ids for o in jax_llm.generate(prompts, params, use_tqdm=False)] == onnx_tokens == expected


def test_gemma3_conditional_generation_matches_transformers(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint exports and gives transformers' tokens: the decoder under
    language_model.model. (as transformers saves it) or model.language_model., and the head tied by Gemma 3's
    default (config.json without tie_word_embeddings)."""
    import json
    import shutil

    import torch
    from safetensors.numpy import load_file, save_file

    from backends.mock import SIMPLE_BPE_PATH

    skip = ("architectures", "model_type", "hidden_act", "initializer_range", "bos_token_id", "eos_token_id",
            "tie_word_embeddings")
    text = {k: v for k, v in TINY_CONFIGS["gemma3"].items() if k not in skip}
    model = gemma3_conditional_model(text)
    with torch.no_grad():  # as onnx_fixtures draws them: far from greedy ties, norms (1 + w) jittered
        for name, p in model.named_parameters():
            if "language_model" in name:
                p.normal_(0.0, 0.1 if "norm" in name else 0.2)
    model_dir = tmp_path / "hf"
    model.save_pretrained(model_dir, safe_serialization=True)
    shutil.copy(SIMPLE_BPE_PATH, model_dir / "tokenizer.json")
    saved = json.loads((model_dir / "config.json").read_text())
    saved.pop("tie_word_embeddings", None)
    saved["text_config"].pop("tie_word_embeddings", None)
    (model_dir / "config.json").write_text(json.dumps(saved))
    tensors = load_file(model_dir / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in tensors and not any(k.startswith("lm_head") for k in tensors)

    prompts = make_prompts()[1:4]  # 17 to 70 tokens: all longer than the sliding window of 8
    expected = hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert onnx_greedy(model_dir, prompts)[0] == expected
    # the other layout transformers reads and writes: the decoder under model.language_model.
    v5 = shutil.copytree(model_dir, model_dir.with_name("v5_layout"))
    prefix = "language_model.model."
    save_file({("model.language_model." + k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in tensors.items()}, v5 / "model.safetensors")
    assert onnx_greedy(v5, prompts)[0] == expected


def test_gemma3_null_sliding_window_has_no_window(reference, tmp_path):
    """sliding_window null: the sliding layers keep their local RoPE and see the whole context (as the JAX
    backend reads it; transformers cannot run such a config, so the reference is a window no prompt fills).
    The export then has no attn_bias_local input, which the runner would not feed."""
    import json

    import onnx

    from backends.onnx.export import MODEL_FILE, ensure_exported

    model_dir = build_tiny_model("gemma3", tmp_path / "null", sliding_window=None)
    wide = build_tiny_model("gemma3", tmp_path / "wide", sliding_window=512)
    _, prompts, windowed = reference["gemma3"]  # the same weights with a window of 8
    expected = hf_greedy(wide, prompts, NEW_TOKENS)
    assert expected != windowed  # the window matters for these prompts
    graph = onnx.load(str(ensure_exported(model_dir) / MODEL_FILE), load_external_data=False).graph
    assert "attn_bias_local" not in [i.name for i in graph.input]
    assert json.loads((model_dir / "config.json").read_text())["sliding_window"] is None
    got, _ = onnx_greedy(model_dir, prompts)
    assert got == expected

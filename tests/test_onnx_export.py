"""The torch-free exporter: CLI, a checker-valid model with external data, a reusable model dir,
a reload in a fresh process, and clear errors for a missing or corrupt .onnx file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from backends.onnx.export import DATA_FILE, METADATA_FILE, MODEL_FILE
from nanovllm_jax import LLM, SamplingParams
from onnx_fixtures import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 6, 7, 8, 9], list(range(100, 140))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

# run in a fresh interpreter: prints the greedy tokens of PROMPTS as JSON
RELOAD = """
import json, sys
from nanovllm_jax import LLM, SamplingParams
llm = LLM(sys.argv[1], backend="onnx", max_model_len=128)
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
print(json.dumps([o.token_ids for o in outs]))
"""

# the CLI, asserting that exporting never imported torch
EXPORT = """
import sys
from backends.onnx.export import main
sys.argv = ["export", sys.argv[1], sys.argv[2]]
main()
assert "torch" not in sys.modules, "the exporter imported torch"
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    model_dir = build_tiny_model("qwen3", tmp_path_factory.mktemp("hf"))
    out = tmp_path_factory.mktemp("exported") / "qwen3-onnx"
    proc = subprocess.run([sys.executable, "-c", EXPORT, str(model_dir), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_writes_a_checked_model_dir(exported):
    assert {MODEL_FILE, DATA_FILE, METADATA_FILE, "config.json", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    onnx.checker.check_model(str(exported / MODEL_FILE))
    model = onnx.load(str(exported / MODEL_FILE), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if t.name.startswith("layers"))
    assert (exported / MODEL_FILE).stat().st_size < 100_000  # the weights live in the data file
    meta = json.loads((exported / METADATA_FILE).read_text())
    assert meta["architecture"] == "qwen3" and meta["num_layers"] == 2 and meta["num_kv_heads"] == 2
    assert meta["head_dim"] == 32 and meta["vocab_size"] == 1024 and meta["dtype"] == "float32"
    assert meta["max_position_embeddings"] == 512


def test_reload_in_fresh_process(exported):
    llm = LLM(str(exported), backend="onnx", max_model_len=128)
    here = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(exported), json.dumps(PROMPTS)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here


def test_missing_onnx_file_names_it(exported, tmp_path):
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / MODEL_FILE).unlink()
    with pytest.raises(ValueError, match=r"model\.onnx.*missing"):
        LLM(str(broken), backend="onnx", max_model_len=128)


def test_corrupt_onnx_file_names_it(exported, tmp_path):
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / MODEL_FILE).write_bytes(b"not an onnx model at all")
    with pytest.raises(ValueError, match=r"cannot load ONNX model file .*model\.onnx"):
        LLM(str(broken), backend="onnx", max_model_len=128)


def test_truncated_weights_give_a_clear_error(exported, tmp_path):
    broken = shutil.copytree(exported, tmp_path / "broken")
    data = broken / DATA_FILE
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.onnx"):
        LLM(str(broken), backend="onnx", max_model_len=128)


def test_kv_cache_sized_from_byte_budget(exported):
    meta = json.loads((exported / METADATA_FILE).read_text())
    kv_bytes = 2 * meta["num_layers"] * 16 * meta["num_kv_heads"] * meta["head_dim"] * 4  # K and V, f32
    block_bytes = kv_bytes + 16 * 4  # and the token ids, as the JAX backend counts a block
    llm = LLM(str(exported), backend="onnx", max_model_len=128, kv_cache_memory_bytes=10 * block_bytes + 5)
    runner = llm.engine.runner
    assert runner.num_kvcache_blocks == 10 == llm.engine.block_manager.num_blocks
    assert runner.k_cache.nbytes + runner.v_cache.nbytes + runner.token_cache.nbytes == 10 * block_bytes
    assert [len(o.token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == [12, 12]
    with pytest.raises(ValueError, match="holds no 16-token block"):
        LLM(str(exported), backend="onnx", max_model_len=128, kv_cache_memory_bytes=block_bytes - 1)


def test_bf16_and_f16_weights_widen_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    from backends.onnx.weights import SafetensorsDir

    values = torch.randn(3, 5)
    save_file({"a": values.to(torch.bfloat16), "b": values.to(torch.float16)}, str(tmp_path / "w.safetensors"))
    weights = SafetensorsDir(tmp_path)
    assert (weights.get("a") == values.to(torch.bfloat16).float().numpy()).all()
    assert (weights.get("b") == values.to(torch.float16).float().numpy()).all()
    assert weights.get("a").dtype == weights.get("b").dtype == np.float32


def test_gemma3_spec_follows_the_jax_backends_config_rules(tmp_path):
    """A multimodal config that stores only its overrides (as hub checkpoints do) reads like the JAX backend
    reads it: transformers' Gemma3TextConfig defaults, the head tied, the text_config's layer types."""
    from backends.onnx.model_spec import read_spec
    from nanovllm_jax.models import gemma3

    hf = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
          "text_config": {"num_hidden_layers": 12, "attn_logit_softcapping": 50.0}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    spec, cfg = read_spec(tmp_path), gemma3.parse_config(hf)
    assert spec.architecture == "gemma3_text" and spec.tie_word_embeddings is True
    assert spec.layer_types == ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",)
    assert (spec.sliding_window, spec.vocab_size, spec.head_dim, spec.num_kv_heads) == (4096, 262_208, 256, 4)
    assert spec.rope == dict(cfg.rope_global) and spec.rope_local == dict(cfg.rope_local)
    assert spec.attn_scale == 256 ** -0.5 and spec.has_local_mask
    (tmp_path / "config.json").write_text(json.dumps(hf | {"text_config": {"sliding_window": None}}))
    assert not read_spec(tmp_path).has_local_mask  # no window: the sliding layers take attn_bias
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "final_logit_softcapping": 30.0}))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        read_spec(tmp_path)


def test_quantized_checkpoints_are_refused(tmp_path, monkeypatch):
    """The exporter reads config.json and the weights through the loader: a quantization_config or a
    non-float tensor is a ValueError, not a garbage export."""
    from safetensors.numpy import load_file, save_file

    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "cache"))
    model_dir = build_tiny_model("qwen3", tmp_path / "w8")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match=r"quantized checkpoints \(quant_method=gptq\) are unsupported"):
        LLM(str(model_dir), backend="onnx", max_model_len=128)
    (model_dir / "config.json").write_text(json.dumps(config))
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = np.ones((64, 128), np.int8)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has dtype I8"):
        LLM(str(model_dir), backend="onnx", max_model_len=128)


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), "partial"),
    (dict(num_attention_heads=4, num_key_value_heads=3), r"\(4\) is not a multiple of num_key_value_heads \(3\)"),
    (dict(mlp_bias=True), "mlp_bias=true is unsupported"),
    (dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], num_attention_heads=4,
          num_key_value_heads=3), "not a multiple"),
])
def test_both_backends_refuse_a_bad_config_with_the_same_message(tmp_path, change, message):
    """The exporter reads configs through the JAX backend's parsers: one set of checks for both."""
    from backends.onnx.model_spec import read_spec
    from nanovllm_jax.models import model_module

    model_dir = build_tiny_model("qwen3", tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text()) | change
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        model_module(config).parse_config(config)
    with pytest.raises(ValueError, match=message):
        read_spec(model_dir)


def test_the_export_cache_is_keyed_by_the_exporter_and_repairs_nothing_silently(tmp_path, monkeypatch):
    from backends.onnx import export
    from nanovllm_jax.disk_cache import UNUSED_TTL_S

    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "cache"))
    model_dir = build_tiny_model("qwen3", tmp_path / "hf")
    cache = tmp_path / "cache"
    unused, not_ours, killed = cache / ("a" * 32), cache / ("b" * 32), cache / ".scratch-1-0000-killed"
    for stale in (unused, not_ours, killed):
        stale.mkdir(parents=True)
    (unused / METADATA_FILE).write_text("{}")
    for stale in (unused, not_ours, killed):
        os.utime(stale, (time.time() - UNUSED_TTL_S - 60,) * 2)
    entry = export.ensure_exported(model_dir)
    assert not unused.exists() and not killed.exists() and not_ours.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by others sharing the cache
    with monkeypatch.context() as patched:
        patched.setattr(export, "EXPORTER_VERSION", export.EXPORTER_VERSION + 1)
        assert export.checkpoint_hash(model_dir) != entry.name
    (entry / DATA_FILE).unlink()
    exported = []
    with monkeypatch.context() as patched, pytest.raises(OSError, match=f"{entry} is incomplete.*delete it"):
        patched.setattr(export, "export_model", lambda *args: exported.append(args))
        export.ensure_exported(model_dir)
    assert not exported  # refused before exporting again
    shutil.rmtree(entry)
    assert export.ensure_exported(model_dir) == entry and (entry / DATA_FILE).exists()


def test_export_in_place(tmp_path):
    from backends.onnx.export import export_model

    model_dir = build_tiny_model("qwen3", tmp_path / "hf")
    export_model(model_dir, model_dir)
    in_place, elsewhere = (LLM(str(d), backend="onnx", max_model_len=128)
                           for d in (model_dir, export_model(model_dir, tmp_path / "elsewhere")))
    assert [o.token_ids for o in in_place.generate(PROMPTS, GREEDY, use_tqdm=False)] == \
        [o.token_ids for o in elsewhere.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_a_model_dir_mixing_two_exports_or_with_bad_metadata_is_refused_at_load(exported, tmp_path):
    """Each loaded, then failed in the first step deep in onnxruntime or numpy, or raised a KeyError."""
    from backends.onnx.export import export_model

    other = export_model(build_tiny_model("qwen3", tmp_path / "hf", vocab_size=512), tmp_path / "other")
    mixed = shutil.copytree(exported, tmp_path / "mixed")
    shutil.copy(other / METADATA_FILE, mixed / METADATA_FILE)
    with pytest.raises(ValueError, match=r"model\.onnx does not match .*onnx_metadata\.json"):
        LLM(str(mixed), backend="onnx", max_model_len=128)
    meta = json.loads((exported / METADATA_FILE).read_text())
    for bad, message in (([], "must hold a JSON object"), ({k: v for k, v in meta.items() if k != "vocab_size"},
                         "lacks or has bad vocab_size"), (meta | {"max_position_embeddings": "128"}, "bad max_position")):
        (mixed / METADATA_FILE).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            LLM(str(mixed), backend="onnx", max_model_len=128)


def test_a_checkpoint_disagreeing_with_its_config_is_refused_at_export(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "cache"))  # an older exporter's entry would load
    model_dir = build_tiny_model("qwen3", tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"vocab_size": 2 * config["vocab_size"]}))
    with pytest.raises(ValueError, match=r"checkpoint tensor embed_tokens has shape \(1024, \d+\), expected \(2048"):
        LLM(str(model_dir), backend="onnx", max_model_len=128)


def test_text_whose_tokens_the_model_lacks_is_refused_before_queueing(tmp_path):
    """The tokenizer holds 1024 tokens, the model 512: the step failed in onnxruntime's Gather."""
    llm = LLM(str(build_tiny_model("qwen3", tmp_path / "hf", vocab_size=512)), backend="onnx", max_model_len=128)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 512\), got \[877, 560\]"):
        llm.generate(["Zebra xylophone"], GREEDY, use_tqdm=False)
    assert [len(o.token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == [12, 12]


def test_cache_and_thread_settings_past_what_can_be_are_value_errors(exported, monkeypatch):
    with pytest.raises(ValueError, match=r"exceed 2\*\*31 - 1 slots"):
        LLM(str(exported), backend="onnx", max_model_len=128, num_kvcache_blocks=10**9)
    with pytest.raises(ValueError, match="does not fit in memory"):
        LLM(str(exported), backend="onnx", max_model_len=128, num_kvcache_blocks=10**8)
    monkeypatch.setenv("NANOVLLM_JAX_ONNX_THREADS", str(2**32))
    with pytest.raises(ValueError, match="NANOVLLM_JAX_ONNX_THREADS must be a number of threads"):
        LLM(str(exported), backend="onnx", max_model_len=128)


def test_the_exporter_cli_names_an_out_dir_it_cannot_write_in_one_line(tmp_path, monkeypatch, capsys):
    from backends.onnx.export import main

    model_dir = build_tiny_model("qwen3", tmp_path / "hf")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(sys, "argv", ["export", str(model_dir), str(tmp_path / "a_file")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and "a_file" in err and len(err.splitlines()) == 1


def test_a_max_model_len_past_the_models_is_refused_before_exporting(tmp_path, monkeypatch):
    """It was refused only once the export (minutes for a large model) was written."""
    monkeypatch.setenv("NANOVLLM_JAX_ONNX_CACHE", str(tmp_path / "cache"))
    model_dir = build_tiny_model("qwen3", tmp_path / "hf")
    with pytest.raises(ValueError, match="max_model_len=1024 exceeds the model's limit of 512"):
        LLM(str(model_dir), backend="onnx", max_model_len=1024)
    assert not list((tmp_path / "cache").glob("*"))

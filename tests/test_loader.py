"""The HF checkpoint loader refuses what it cannot load right: quantized checkpoints (config.json
`quantization_config`) and tensors of a non-float dtype raise a ValueError instead of loading integer codes or
FP8 values as if they were weights. Converted GGUF dirs (dequantized, plain float) still load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from nanovllm_jax.loader import load_model
from onnx_fixtures import build_tiny_model


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


def _int8_with_scales(src: Path, dst: Path) -> Path:
    """The compressed-tensors W8A8 layout: int8 codes + per-channel f32 `weight_scale` beside each linear."""
    dst.mkdir()
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors[name]
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
        tensors[name] = np.round(w / scale).astype(np.int8)
        tensors[name[:-len("weight")] + "weight_scale"] = scale.astype(np.float32)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _fp8(src: Path, dst: Path) -> Path:
    """The FP8 layout: F8_E4M3 linear weights + `weight_scale_inv`."""
    import torch
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    dst.mkdir()
    tensors = torch_load(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.ones(1)
    torch_save(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _set_config(model_dir: Path, **fields) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | fields))


COMPRESSED_TENSORS = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
    "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}


def test_int8_checkpoint_with_quantization_config_is_refused(float_dir, tmp_path):
    model_dir = _int8_with_scales(float_dir, tmp_path / "w8")
    _set_config(model_dir, quantization_config=COMPRESSED_TENSORS)
    with pytest.raises(ValueError, match=r"quantized checkpoints \(quant_method=compressed-tensors\) are unsupported"):
        load_model(model_dir)


def test_fp8_checkpoint_with_quantization_config_is_refused(float_dir, tmp_path):
    model_dir = _fp8(float_dir, tmp_path / "fp8")
    _set_config(model_dir, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match=r"quantized checkpoints \(quant_method=fp8\) are unsupported"):
        load_model(model_dir)


def test_quantization_config_of_a_multimodal_text_config_is_refused(float_dir, tmp_path):
    model_dir = tmp_path / "mm"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes((float_dir / "model.safetensors").read_bytes())
    text = json.loads((float_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "text_config": text | {"quantization_config": {"quant_method": "awq"}}}))
    with pytest.raises(ValueError, match=r"quant_method=awq"):
        load_model(model_dir)


@pytest.mark.parametrize("make, dtype", [(_int8_with_scales, "I8"), (_fp8, "F8_E4M3")])
def test_non_float_tensor_names_the_tensor_and_dtype(float_dir, tmp_path, make, dtype):
    """Without a quantization_config the weights themselves give it away (FP8 used to raise numpy's
    AttributeError, int8 codes loaded as weights)."""
    model_dir = make(float_dir, tmp_path / "quantized")
    with pytest.raises(ValueError, match=rf"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has dtype {dtype}"):
        load_model(model_dir)


def test_float_checkpoint_and_null_quantization_config_load(float_dir, tmp_path):
    """A float checkpoint with the field present but null (some exporters write it) is not quantized."""
    model_dir = tmp_path / "null"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes((float_dir / "model.safetensors").read_bytes())
    (model_dir / "config.json").write_text((float_dir / "config.json").read_text())
    _set_config(model_dir, quantization_config=None)
    _, cfg, params = load_model(model_dir)
    assert cfg.num_layers == 2 and params["embed"].shape == (1024, 64)


def test_converted_gguf_dir_loads(tmp_path):
    """A quantized GGUF (Q8_0, Q4_0, ...) converts to plain float safetensors without a quantization_config."""
    import gguf_synth as synth
    from nanovllm_jax.gguf import convert_gguf

    vocab = synth.Vocab("llama")
    config = synth.tiny_config("llama", len(vocab))
    weights = synth.random_state_dict(config)
    path = synth.write_gguf(tmp_path / "model.gguf", config, weights, vocab)
    model_dir = convert_gguf(path, cache_dir=tmp_path / "cache")
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    _, cfg, params = load_model(model_dir)
    assert cfg.num_layers == 2
    np.testing.assert_allclose(np.asarray(params["embed"]), weights["model.embed_tokens.weight"],
                               atol=np.abs(weights["model.embed_tokens.weight"]).max() / 100)


def test_a_sharded_checkpoint_loads_and_a_tensor_stored_twice_is_named(float_dir, tmp_path):
    """Shards listed by the index load as one checkpoint; a tensor in two shards is an error naming both
    (which copy was loaded depended on the files' order)."""
    tensors = load_file(float_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((float_dir / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, _, params = load_model(sharded)
    _, _, reference = load_model(float_dir)
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(reference["embed"]))
    save_file({n: tensors[n] * 2 for n in names[:half + 1]}, str(sharded / "model-00001-of-00002.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor '{names[half]}' is stored twice .*model-00001-of-00002"
                                         rf".*model-00002-of-00002"):
        load_model(sharded)

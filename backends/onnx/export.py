"""HF checkpoint dir → exported ONNX model dir (no torch).

    python -m backends.onnx.export MODEL_DIR OUT_DIR

OUT_DIR gets model.onnx + model.onnx.data (external weights), onnx_metadata.json, and the HF
config/tokenizer files, so it is itself a model dir that `LLM(OUT_DIR, backend="onnx")` accepts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import onnx
import xxhash

from backends.onnx.graph import OPSET, build_graph
from backends.onnx.model_spec import read_spec
from backends.onnx.weight_writer import WeightWriter
from backends.onnx.weights import SafetensorsDir
from nanovllm_jax import disk_cache

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
METADATA_FILE = "onnx_metadata.json"
FORMAT_VERSION = 2  # bump when the graph's inputs or outputs change: the runner refuses older exports
EXPORTER_VERSION = 2  # bump when what an export holds changes (graph, weights, config reading, RoPE tables)
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the HF checkpoint in `model_dir` to `out_dir`; returns `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = read_spec(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = WeightWriter(out_dir / DATA_FILE)
    try:
        model = build_graph(spec, SafetensorsDir(model_dir), writer)
    finally:
        writer.close()
    onnx.save_model(model, out_dir / MODEL_FILE)
    onnx.checker.check_model(str(out_dir / MODEL_FILE))  # by path: checks the external data too
    for name in _COPIED:
        source, copy = model_dir / name, out_dir / name
        if source.exists() and not (copy.exists() and copy.samefile(source)):  # the same file: exported in place
            shutil.copy(source, copy)
    metadata = {
        "format_version": FORMAT_VERSION,
        "opset": OPSET,
        "dtype": "float32",
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "source": str(model_dir.resolve()),
        **spec.to_json(),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return out_dir


def is_exported_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).exists()


def _is_complete(entry: Path) -> bool:
    return all((entry / name).exists() for name in (METADATA_FILE, MODEL_FILE, DATA_FILE))


def _is_cache_entry(path: Path) -> bool:
    return re.fullmatch(disk_cache.DIGEST, path.name) is not None and is_exported_dir(path)


def cache_root() -> Path:
    return Path(os.environ.get("NANOVLLM_JAX_ONNX_CACHE") or disk_cache.cache_home() / "onnx")


def checkpoint_hash(model_dir: str | os.PathLike) -> str:
    """Hash of the exporter's versions, the config and the weights: a changed checkpoint or exporter
    never reuses a stale export."""
    h = xxhash.xxh3_128()
    h.update(FORMAT_VERSION.to_bytes(4, "little") + EXPORTER_VERSION.to_bytes(4, "little"))
    model_dir = Path(model_dir)
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def ensure_exported(model_dir: str | os.PathLike) -> Path:
    """An exported dir for `model_dir`: itself if already exported, else the (possibly new) cache entry."""
    if is_exported_dir(model_dir):
        return Path(model_dir)
    read_spec(model_dir)  # an unsupported or quantized checkpoint fails here, before hashing its weights
    root = cache_root()
    target = root / checkpoint_hash(model_dir)
    if disk_cache.lookup(target, _is_complete):
        return target
    disk_cache.writable_dir(root, "NANOVLLM_JAX_ONNX_CACHE")
    disk_cache.remove_unused(root, _is_cache_entry)
    # export aside, then rename: a crash or a concurrent export never leaves half a dir
    tmp = disk_cache.scratch_path(root, target.name)
    start = time.perf_counter()
    try:
        export_model(model_dir, tmp)
        if disk_cache.publish(tmp, target, _is_complete):
            print(f"exported {model_dir} to ONNX in {time.perf_counter() - start:.1f}s: {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="HF checkpoint dir (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="where to write the exported model dir")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        out = export_model(args.model_dir, args.out_dir)
    except (ValueError, OSError) as e:  # e.g. no such dir, an unsupported model, an unwritable OUT_DIR: one line
        parser.exit(1, f"error: {e}\n")
    size = (out / DATA_FILE).stat().st_size / 2**20
    print(f"wrote {out / MODEL_FILE} (+ {DATA_FILE}, {size:.1f} MiB) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

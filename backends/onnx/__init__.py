"""The ONNX backend: a torch-free exporter for HF Llama / Qwen2 / Qwen3 / Gemma 3 checkpoints and an onnxruntime runner."""
from __future__ import annotations

__all__ = ["OnnxRunner", "export_model"]


def __getattr__(name: str):
    # lazy, so that `python -m backends.onnx.export` does not import its own module twice
    if name == "OnnxRunner":
        from backends.onnx.runner import OnnxRunner

        return OnnxRunner
    if name == "export_model":
        from backends.onnx.export import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The ONNX backend: the same engine on onnxruntime, for deployment without JAX.

    python examples/onnx_example.py /path/to/hf_model_dir      # Llama / Qwen2 / Qwen3 / Gemma 3 (text) safetensors
    python examples/onnx_example.py /path/to/exported_onnx_dir # or a dir made by backends.onnx.export

An HF dir is exported on first use into ~/.cache/nanovllm_jax/onnx/<hash> (no torch needed);
`python -m backends.onnx.export MODEL_DIR OUT_DIR` does the same ahead of time. Without an
argument the script builds a tiny random Qwen3 checkpoint so that it runs anywhere.
Migrating from the mock or JAX backend is the one argument backend="onnx".
"""
import sys
import tempfile
from pathlib import Path

from nanovllm_jax import LLM, SamplingParams

if len(sys.argv) > 1:
    model = sys.argv[1]
else:  # a random-weight model: the text is gibberish, the engine is real
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from onnx_fixtures import build_tiny_model

    model = str(build_tiny_model("qwen3", Path(tempfile.mkdtemp()) / "tiny-qwen3"))

llm = LLM(model, backend="onnx", max_model_len=512)
prompts = ["Continuous batching keeps the device busy", "Paged attention reads the cache by block table"]
params = [SamplingParams(temperature=0.0, max_tokens=24), SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_tokens=24)]
for prompt, out in zip(prompts, llm.generate(prompts, params)):
    print(f"{prompt!r} -> {len(out.token_ids)} tokens ({out.finish_reason}): {out.text!r}")
print(f"KV cache: {llm.engine.runner.num_kvcache_blocks} blocks of {llm.config.kvcache_block_size} tokens")

"""GPU checks for a lent device machine (one call; see benchmarks/gpu_run.sh).

1. `kernel`: paged attention with the Pallas kernel against the pure-JAX walk on a
   Qwen3-0.6B-shaped decode step (256 sequences, contexts 100-2047, scattered pages, layer 1 of 2):
   relative error in f32 (highest precision) and bf16, and the time of each.
2. `parity`: greedy tokens of the engine on the GPU (f32, both attention paths) against
   transformers on the CPU, tiny random Qwen3, chunked prefill + prefix caching.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def scattered_contexts(rng: np.random.Generator, seqs: int, min_len: int, max_len: int, kv: int, d: int, bs: int,
                       dtype) -> tuple[np.ndarray, np.ndarray, jax.Array, jax.Array]:
    """Context lengths in [min_len, max_len), each sequence's pages scattered over a 2-layer cache ->
    (lens, block tables, k_cache, v_cache)."""
    lens = rng.integers(min_len, max_len, size=seqs)
    width = max_len // bs
    tables = rng.permutation(seqs * width).reshape(seqs, width).astype(np.int32)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((2, kv, seqs * width * bs, d), np.float32), dtype) for _ in "kv")
    return lens, tables, k_cache, v_cache


def kernel_check(dtype: str, seqs: int = 256, kv: int = 8, heads: int = 16, d: int = 128, bs: int = 16) -> None:
    from nanovllm_jax.layers.attention import AttentionMetadata, paged_attention
    from nanovllm_jax.layers.attention_kernel import pack_query_tiles, query_tile

    rng = np.random.default_rng(0)
    lens, tables, k_cache, v_cache = scattered_contexts(rng, seqs, 100, 2048, kv, d, bs, dtype)
    q = jnp.asarray(rng.standard_normal((seqs, heads, d), np.float32), dtype)
    k_new, v_new = (jnp.asarray(rng.standard_normal((seqs, kv, d), np.float32), dtype) for _ in "kv")
    slots = tables[np.arange(seqs), lens // bs] * bs + lens % bs  # the new tokens' K/V, written as the model does
    k_cache, v_cache = k_cache.at[1, :, slots].set(k_new), v_cache.at[1, :, slots].set(v_new)
    tile = query_tile(seqs, seqs, heads // kv, d)
    tiles = jnp.asarray(pack_query_tiles(np.arange(seqs + 1), seqs, seqs, tile))

    def run(kernel: bool):
        meta = AttentionMetadata(jnp.asarray(lens, jnp.int32), jnp.arange(seqs, dtype=jnp.int32),
                                 jnp.asarray(lens, jnp.int32), jnp.asarray(tables), block_size=bs, pages_per_chunk=8,
                                 token_block=256, new_block=512,  # the GPU's tiling
                                 **(dict(query_tile=tile, query_tiles=tiles) if kernel else {}))
        fn = jax.jit(lambda *a: paged_attention(*a, meta, scale=d ** -0.5, layer=jnp.int32(1)))
        args = (q, k_new, v_new, k_cache, v_cache)
        out = fn(*args).block_until_ready()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        return np.asarray(out, np.float32), float(np.median(times)) * 1e3

    ref, xla_ms = run(False)
    out, kernel_ms = run(True)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    read_gb = 2 * float(lens.sum()) * kv * d * jnp.dtype(dtype).itemsize / 1e9
    print(f"kernel {dtype}: rel err vs xla walk {err:.2e}; xla walk {xla_ms:.3f} ms, pallas {kernel_ms:.3f} ms "
          f"({read_gb / kernel_ms * 1e3:.0f} GB/s of context K/V), speedup {xla_ms / kernel_ms:.1f}x", flush=True)
    assert np.isfinite(out).all() and err < (1e-5 if dtype == "float32" else 2e-2), err


def parity_check() -> None:
    from hf_models import build_tiny_model, load_reference, reference_greedy
    from nanovllm_jax import LLM, SamplingParams

    model_dir = build_tiny_model("qwen3", Path(tempfile.mkdtemp()) / "qwen3")
    rng = np.random.default_rng(1)
    shared = rng.integers(2, 1024, size=40).tolist()
    prompts = [shared + rng.integers(2, 1024, size=n).tolist() for n in (3, 30, 70)] + [rng.integers(2, 1024, 5).tolist()]
    reference = load_reference(model_dir)
    expected = [reference_greedy(reference, p, 24) for p in prompts]
    for path in ("pallas", "xla") if jax.default_backend() == "gpu" else ("xla",):
        os.environ["NANOVLLM_JAX_ATTENTION"] = path
        llm = LLM(str(model_dir), dtype="float32", max_num_seqs=4, max_num_batched_tokens=64)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
        got = [o.token_ids for o in outs]
        same = sum(g == e for g, e in zip(got, expected))
        print(f"parity {path}: {same}/{len(prompts)} prompts greedy == transformers", flush=True)
        assert same == len(prompts), (got, expected)
        del llm


if __name__ == "__main__":
    print(jax.devices(), jax.__version__, flush=True)
    small = jax.default_backend() != "gpu"  # a dry run elsewhere: the kernel in interpret mode is slow
    jax.config.update("jax_default_matmul_precision", "highest")
    kernel_check("float32", seqs=4 if small else 64)
    jax.config.update("jax_default_matmul_precision", None)
    kernel_check("bfloat16", seqs=4 if small else 256)
    jax.config.update("jax_default_matmul_precision", "highest")
    parity_check()

"""Launch settings of the Pallas attention kernel on a lent GPU: time each KernelTuning on decode steps
of 256 and 32 sequences (Qwen3-0.6B heads, bf16, contexts 100-2047 on scattered pages), check the
fastest against the pure-JAX walk (gpu_check.kernel_check), then run nano-vllm's workload with it.

    python benchmarks/gpu_kernel_sweep.py OUT_DIR
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax import bench
from nanovllm_jax.layers import attention_kernel
from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.layers.attention_kernel import KernelTuning, pack_query_tiles, paged_attention_kernel, query_tile

from gpu_block_sweep import timed  # beside this script
from gpu_check import kernel_check, scattered_contexts

BUDGET_S = 150
GPU = jax.default_backend() == "gpu"  # elsewhere: a dry run of the code paths (interpret mode, small sizes)


def decode_inputs(seqs: int, kv: int = 8, g: int = 2, d: int = 128, bs: int = 16, dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    max_len = 2048 if GPU else 256
    lens, tables, k_cache, v_cache = scattered_contexts(rng, seqs, max_len // 20, max_len, kv, d, bs, dtype)
    q = jnp.asarray(rng.standard_normal((seqs, kv * g, d), np.float32), dtype)
    tile = query_tile(seqs, seqs, g, d)
    meta = AttentionMetadata(jnp.asarray(lens - 1, jnp.int32), jnp.arange(seqs, dtype=jnp.int32),
                             jnp.asarray(lens - 1, jnp.int32), jnp.asarray(tables), block_size=bs, pages_per_chunk=16,
                             query_tile=tile, query_tiles=jnp.asarray(pack_query_tiles(np.arange(seqs + 1), seqs, seqs,
                                                                                       tile)))
    read_gb = 2 * float(lens.sum()) * kv * d * jnp.dtype(dtype).itemsize / 1e9
    return (q, k_cache, v_cache, meta), read_gb


def time_ms(tuning: KernelTuning, inputs) -> float:
    q, k_cache, v_cache, meta = inputs
    fn = jax.jit(lambda q, k, v: paged_attention_kernel(q, k, v, 1, meta, scale=0.1, sliding_window=None, softcap=None,
                                                        tuning=tuning))
    return timed(fn, q, k_cache, v_cache)


def prefill_ms(tuning: KernelTuning, seqs: int = 16, new: int = 512, kv: int = 8, g: int = 2, d: int = 128,
               bs: int = 16, dtype=jnp.bfloat16) -> float:
    """A prefill step: `seqs` chunks of `new` tokens after cached prefixes of 0-1024 tokens (scattered pages)."""
    if not GPU:
        seqs, new = 2, 16
    rng = np.random.default_rng(0)
    _, tables, k_cache, v_cache = scattered_contexts(rng, seqs, 1, 2048, kv, d, bs, dtype)
    cached = rng.integers(0, 1024, size=seqs)
    t = seqs * new
    positions = (cached[:, None] + np.arange(new)).reshape(-1).astype(np.int32)
    seq_ids = np.repeat(np.arange(seqs), new).astype(np.int32)
    tile = query_tile(t, seqs, g, d, tuning)
    meta = AttentionMetadata(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(cached[seq_ids], jnp.int32),
                             jnp.asarray(tables[seq_ids]), block_size=bs, pages_per_chunk=16, query_tile=tile,
                             query_tiles=jnp.asarray(pack_query_tiles(np.arange(seqs + 1) * new, t, seqs, tile)))
    q = jnp.asarray(rng.standard_normal((t, kv * g, d), np.float32), dtype)
    return time_ms(tuning, (q, k_cache, v_cache, meta))


def sweep() -> list[dict]:
    """Key tile x splits at Triton's default launch (4 warps, 3 stages), then warps x stages around the
    fastest of those; then the prefill query tile (rows per program) with that decode tuning."""
    cases = {seqs: decode_inputs(seqs if GPU else 2) for seqs in (256, 32)}
    results, start = [], time.perf_counter()

    def measure(tuning: KernelTuning) -> dict:
        row = dict(tuning=tuning.__dict__)
        if time.perf_counter() - start > BUDGET_S:
            return row | dict(error="out of the sweep's time budget")
        try:
            for seqs, (inputs, read_gb) in cases.items():
                ms = time_ms(tuning, inputs)
                row[f"ms_{seqs}"], row[f"gb_s_{seqs}"] = ms, read_gb / ms * 1e3
        except Exception as e:  # e.g. out of shared memory
            row["error"] = str(e).splitlines()[0][:120]
        print(json.dumps(row), flush=True)
        results.append(row)
        return row

    for tile, splits in itertools.product((32 << 10, 16 << 10, 64 << 10), (1, 2, 4, 8)):
        measure(KernelTuning(key_tile_bytes=tile, splits=splits, split_below=1 << 30, num_warps=4, num_stages=3))
    best = fastest(results)["tuning"]
    for warps, stages in itertools.product((4, 8), (2, 3, 4)):
        if (warps, stages) != (4, 3):
            measure(KernelTuning(**best | dict(num_warps=warps, num_stages=stages)))
    best = fastest(results)["tuning"]
    for rows in (16, 32, 64, 128):  # the query tile of prefill steps (8192 tokens of 16 sequences)
        tuning = KernelTuning(**best | dict(prefill_rows=rows))
        row = dict(tuning=tuning.__dict__)
        try:
            row["prefill_ms"] = prefill_ms(tuning)
        except Exception as e:  # e.g. out of shared memory or registers
            row["error"] = str(e).splitlines()[0][:120]
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def fastest(results: list[dict]) -> dict:
    """The fastest decode tuning, with the fastest prefill tile when those were timed."""
    best = min((r for r in results if "ms_256" in r), key=lambda r: r["ms_256"] + r["ms_32"])
    prefill = [r for r in results if "prefill_ms" in r]
    if prefill:
        rows = min(prefill, key=lambda r: r["prefill_ms"])["tuning"]["prefill_rows"]
        best = best | dict(tuning=best["tuning"] | dict(prefill_rows=rows))
    return best


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(jax.devices(), jax.__version__, "default:", KernelTuning(), flush=True)
    results = sweep()
    best = fastest(results)
    print("fastest:", best, flush=True)
    (out / "kernel_sweep.json").write_text(json.dumps(dict(results=results, fastest=best), indent=1))
    attention_kernel.TUNING = KernelTuning(**best["tuning"])
    jax.config.update("jax_default_matmul_precision", "highest")
    kernel_check("float32", seqs=64 if GPU else 2)
    jax.config.update("jax_default_matmul_precision", None)
    kernel_check("bfloat16", seqs=256 if GPU else 2)
    if not GPU:
        sys.exit()
    bench.main(["--random-weights", "qwen3-0.6b", "--num-seqs", "256", "--min-input-len", "100", "--max-input-len",
                "1024", "--min-output-len", "100", "--max-output-len", "1024", "--max-num-seqs", "256",
                "--max-num-batched-tokens", "8192", "--json", str(out / "bench_tuned.json")])

"""The attention kernel by KV block size on a lent GPU: decode steps of 256 and 64 sequences (Qwen3-0.6B
heads, bf16, contexts 100-2047 on scattered pages) at block sizes 16-256 and two key tiles, beside
contiguous pages and a plain copy (the bandwidth a kernel can reach). Prints one JSON line per case
and writes them to OUT_DIR/block_sweep.json; the last line names the fastest block size.

    python benchmarks/gpu_block_sweep.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanovllm_jax.layers.attention import AttentionMetadata
from nanovllm_jax.layers.attention_kernel import KernelTuning, pack_query_tiles, paged_attention_kernel, query_tile

GPU = jax.default_backend() == "gpu"  # elsewhere: a dry run of the code paths (interpret mode, small sizes)
KV, GROUP, DIM, MAX_LEN = 8, 2, 128, 2048 if GPU else 512


def timed(fn, *args, runs: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(runs):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / runs * 1e3


def decode_case(seqs: int, bs: int, contiguous: bool = False):
    rng = np.random.default_rng(seqs)
    lens = rng.integers(MAX_LEN // 20, MAX_LEN, size=seqs)
    width = MAX_LEN // bs
    order = np.arange(seqs * width) if contiguous else rng.permutation(seqs * width)
    tables = order.reshape(seqs, width).astype(np.int32)
    tile = query_tile(seqs, seqs, GROUP, DIM)
    meta = AttentionMetadata(jnp.asarray(lens - 1, jnp.int32), jnp.arange(seqs, dtype=jnp.int32),
                             jnp.asarray(lens - 1, jnp.int32), jnp.asarray(tables), block_size=bs,
                             pages_per_chunk=max(1, 128 // bs), query_tile=tile,
                             query_tiles=jnp.asarray(pack_query_tiles(np.arange(seqs + 1), seqs, seqs, tile)))
    q = jax.random.normal(jax.random.key(seqs), (seqs, KV * GROUP, DIM), jnp.bfloat16)
    read_gb = 2 * float(lens.sum()) * KV * DIM * 2 / 1e9
    return q, meta, read_gb


def main(out: Path) -> None:
    slots = 256 * MAX_LEN if GPU else 4 * MAX_LEN
    k_cache, v_cache = (jax.random.normal(jax.random.key(i), (2, KV, slots, DIM), jnp.bfloat16) for i in (1, 2))
    copy_gb = 2 * k_cache.size * 2 / 1e9  # read and written
    copy_ms = timed(jax.jit(lambda x: x * 2), k_cache)
    rows = [dict(case="copy", ms=copy_ms, tb_s=copy_gb / copy_ms)]
    print(json.dumps(rows[-1]), flush=True)
    cases = [(16, 16, False), (16, 32, False), (16, 16, True)]
    cases += [(bs, tile, False) for bs in (32, 64, 128, 256) for tile in (16, 32)]
    check_seqs = 64 if GPU else 4
    reference = None  # contiguous pages hold each sequence's keys at the same slots for every block size
    for bs, tile_kb, contiguous in cases:
        tuning = KernelTuning(key_tile_bytes=tile_kb << 10)
        row = dict(block_size=bs, key_tile_kb=tile_kb, contiguous=contiguous)

        def attention(q, k, v, meta, tuning=tuning):
            return paged_attention_kernel(q, k, v, 1, meta, scale=0.1, sliding_window=None, softcap=None,
                                          tuning=tuning)

        try:
            for seqs in (256, 64) if GPU else (4,):
                q, meta, read_gb = decode_case(seqs, bs, contiguous)
                ms = timed(jax.jit(attention), q, k_cache, v_cache, meta)
                row[f"ms_{seqs}"], row[f"tb_s_{seqs}"] = round(ms, 4), round(read_gb / ms, 3)
            q, meta, _ = decode_case(check_seqs, bs, contiguous=True)
            got = np.asarray(jax.jit(attention)(q, k_cache, v_cache, meta), np.float32)
            reference = got if reference is None else reference
            row["rel_diff"] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
        except Exception as e:  # e.g. out of shared memory
            row["error"] = str(e).splitlines()[0][:160]
        print(json.dumps(row), flush=True)
        rows.append(row)
    timed_rows = [r for r in rows if "ms_256" in r and not r["contiguous"]] if GPU else []
    fastest = min(timed_rows, key=lambda r: r["ms_256"]) if timed_rows else None
    (out / "block_sweep.json").write_text(json.dumps(dict(rows=rows, fastest=fastest), indent=1))
    print("fastest block size:", fastest["block_size"] if fastest else 16, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

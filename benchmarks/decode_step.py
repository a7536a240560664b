"""Decode step time of the JAX runner for B sequences, on a random-weight Qwen3-0.6B-shaped model.

No checkpoint is written: random params are built straight into the pytree. Every decode row
reads a context of --context tokens (cache contents don't change the cost). Each timed call is a
full JaxRunner.execute: host packing, one transfer, the compiled step, the token readback; the
device programs alone (forward + sampler on an already transferred step) are timed apart.

    .venv/bin/python benchmarks/decode_step.py --batch-sizes 1 8 32 --context 256

Layers run as the platform's tiling says (unrolled on CPU and GPU, lax.scan on TPU); NANOVLLM_JAX_LAYERS=scan|unroll
overrides it, as for the engine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from nanovllm_jax.config import EngineConfig
from nanovllm_jax.jax_runner import JaxRunner, tiling_for
from nanovllm_jax.models import llama
from nanovllm_jax.random_models import RANDOM_CONFIGS
from nanovllm_jax.runner import SamplingBatch, StepBatch


def decode_batch(batch: int, context: int, block_size: int, blocks_per_seq: int, width: int) -> StepBatch:
    tables = np.full((batch, width), -1, np.int32)
    for s in range(batch):
        tables[s, :blocks_per_seq] = np.arange(s * blocks_per_seq, (s + 1) * blocks_per_seq)
    pos = np.full(batch, context - 1, np.int32)
    zeros, ones = np.zeros(batch, np.float32), np.ones(batch, np.float32)
    sampling = SamplingBatch(
        temperature=zeros, top_k=np.zeros(batch, np.int32), top_p=ones, min_p=zeros,
        seeds=np.arange(batch, dtype=np.uint32), repetition_penalty=ones, presence_penalty=zeros,
        frequency_penalty=zeros, prompt_lens=np.full(batch, context // 2, np.int32),
        banned_token_ids=np.full((batch, 1), -1, np.int32), num_logprobs=0,
    )
    return StepBatch(
        input_ids=np.arange(batch, dtype=np.int32) + 100, prev_rows=np.full(batch, -1, np.int32), positions=pos,
        slot_mapping=tables[np.arange(batch), pos // block_size] * block_size + pos % block_size,
        query_start=np.arange(batch + 1, dtype=np.int32), context_lens=pos + 1, block_tables=tables,
        logits_indices=np.arange(batch, dtype=np.int32), needs_sample=np.ones(batch, bool), sampling=sampling,
    )


def decode_runner(model: str, max_batch: int, context: int, max_model_len: int,
                  dtype: str) -> tuple[JaxRunner, float]:
    """A JaxRunner on random `model` weights for decode steps of up to max_batch rows of `context`
    tokens (16-token blocks), and the seconds the params took to build."""
    model_config = llama.parse_config(RANDOM_CONFIGS[model])
    start = time.perf_counter()
    params = llama.random_params(model_config, dtype=dtype, stacked=tiling_for(jax.default_backend()).scan_layers)
    load_s = time.perf_counter() - start
    config = EngineConfig(model=f"random:{model}", max_num_seqs=max_batch, max_num_batched_tokens=max_batch,
                          max_model_len=max_model_len, num_kvcache_blocks=max_batch * -(-context // 16),
                          dtype=dtype, kvcache_block_size=16)
    return JaxRunner(config, loaded=(llama, model_config, params)), load_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", choices=sorted(RANDOM_CONFIGS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=256, help="context tokens each decode row attends to")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()

    runner, load_s = decode_runner(args.model, max(args.batch_sizes), args.context, args.max_model_len, args.dtype)
    config, block_size = runner.config, runner.block_size
    blocks_per_seq = -(-args.context // block_size)
    results = {"model": args.model, "dtype": args.dtype, "context": args.context, "load_s": load_s,
               "warmup_s": runner.warmup_seconds, "programs": len(runner.buckets), "steps": {},
               "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"}
    print(f"random params built in {load_s:.1f}s; {len(runner.buckets)} programs compiled in {runner.warmup_seconds:.1f}s")
    for batch in args.batch_sizes:
        step = decode_batch(batch, args.context, block_size, blocks_per_seq, config.max_blocks_per_seq)
        runner.execute(step)  # first call: buffers settle
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            runner.execute(step)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1000
        pack_ms, forward_ms, sampler_ms = _parts(runner, step, args.steps)
        results["steps"][batch] = {"median_ms": ms, "min_ms": min(times) * 1000, "tok_per_s": batch / ms * 1000,
                                   "pack_ms": pack_ms, "forward_ms": forward_ms, "sampler_ms": sampler_ms}
        print(f"B={batch:3d}  step {ms:8.1f} ms (min {min(times) * 1000:.1f})  {batch / ms * 1000:8.1f} tok/s  "
              f"[host packing {pack_ms:.2f} ms, forward {forward_ms:.2f} ms, sampler {sampler_ms:.2f} ms]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _parts(runner: JaxRunner, step: StepBatch, repeats: int) -> tuple[float, float, float]:
    """Median ms of the host packing, the forward program and the sampler program, each alone."""
    from nanovllm_jax.buckets import bucket_for

    layout, forward, sampler = runner._programs(bucket_for(step.num_tokens, runner._token_buckets), "greedy")
    pack, fwd, sample = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        packed = layout.pack(step)
        pack.append(time.perf_counter() - t0)
        packed = jax.device_put(packed).block_until_ready()
        t0 = time.perf_counter()
        logits, section, runner.k_cache, runner.v_cache, runner.token_cache = forward(
            runner.params, runner.k_cache, runner.v_cache, runner.token_cache, runner._no_tokens, packed)
        logits.block_until_ready()
        t1 = time.perf_counter()
        sampler(logits, runner.token_cache, section).token_ids.block_until_ready()
        fwd.append(t1 - t0)
        sample.append(time.perf_counter() - t1)
    return tuple(statistics.median(x) * 1000 for x in (pack, fwd, sample))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Everything in benchmarks/gpu-h200.md in one call on a lent GPU machine (run from the repo root;
# logs and JSON land in $OUT; about 7 minutes on an H200 plus the machine's start):
# kernel + parity checks, nano-vllm's workload (async scheduling, then the host waiting for every step),
# decode-step times, a profile, a decode step with layers unrolled. (The pure-JAX path, 2169 tok/s,
# is `bench xla 1`: ~2 more minutes.)
# (benchmarks/gpu_kernel_sweep.py, which picked the kernel's launch settings, runs apart.)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# cuBLAS for every GEMM: compiling a dozen bucket programs stays short (no Triton GEMM autotuning).
export XLA_FLAGS="--xla_gpu_enable_triton_gemm=false"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "it/s]\|^WARNING\|^I0000\|^E0000\|^W0000"; }
WORKLOAD="--random-weights qwen3-0.6b --num-seqs 256 --min-input-len 100 --max-input-len 1024
  --min-output-len 100 --max-output-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192"
bench() {  # $1: attention path, $2: rounds (runs of one loaded engine; the median is reported)
  NANOVLLM_JAX_ATTENTION=$1 timeout 200 python3 -m nanovllm_jax.bench $WORKLOAD --rounds $2 \
    --json "$OUT/bench_$1.json" 2>&1 | quiet | tail -3
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | quiet | tee "$OUT/check.log"
bench pallas 3
timeout 150 python3 benchmarks/async_ab.py sync $WORKLOAD --json "$OUT/bench_pallas_host_waits.json" 2>&1 | quiet | tail -4
for context in 16 1024; do
  timeout 90 python3 benchmarks/decode_step.py --dtype bfloat16 --batch-sizes 256 --max-model-len 2048 \
    --context $context --json "$OUT/decode_step_ctx$context.json" 2>&1 | quiet | tail -1
done
timeout 90 python3 benchmarks/gpu_profile.py 1024 2>&1 | grep "ms/step" | head -16 | tee "$OUT/profile_ctx1024.log"
# Layers unrolled instead of lax.scan: ~15 kernels per layer instead of 23 and no per-layer weight
# copies, counted without a GPU (gpu_aot_census.py); stop 10 timed unrolled slower (5.7 vs 5.1 ms).
timeout 90 python3 benchmarks/decode_step.py --dtype bfloat16 --batch-sizes 256 --max-model-len 2048 \
  --context 16 --unroll --json "$OUT/decode_step_ctx16_unrolled.json" 2>&1 | quiet | tail -1

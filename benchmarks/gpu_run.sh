#!/usr/bin/env bash
# The GPU checks of benchmarks/gpu-h200.md in one call on a lent machine (run from the repo root; logs
# and JSON land in $OUT; about 5 minutes on an H200 plus the machine's start), most wanted first,
# since a device call's limit cuts the tail if compiles run long: kernel + parity checks; nano-vllm's
# workload over 3 rounds (with the host's time per step); the kernel by KV block size; a profile of a
# decode step; the host's put of a step. (The pure-JAX attention path, 2169 tok/s in session 11, is
# `NANOVLLM_JAX_ATTENTION=xla`; layers unrolled, `NANOVLLM_JAX_LAYERS=unroll`; the kernel's launch
# settings, `gpu_kernel_sweep.py OUT`.)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# cuBLAS for every GEMM: compiling a dozen bucket programs stays short (no Triton GEMM autotuning).
FLAGS="--xla_gpu_enable_triton_gemm=false"
export XLA_FLAGS="$FLAGS"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "it/s]\|^WARNING\|^I0000\|^E0000\|^W0000"; }
WORKLOAD="--random-weights qwen3-0.6b --num-seqs 256 --min-input-len 100 --max-input-len 1024
  --min-output-len 100 --max-output-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__)"
timeout 120 python3 benchmarks/gpu_check.py 2>&1 | quiet | tee "$OUT/check.log"
timeout 200 python3 benchmarks/async_ab.py async $WORKLOAD --rounds 3 --json "$OUT/bench.json" 2>&1 | quiet | tail -8
timeout 150 python3 benchmarks/gpu_block_sweep.py "$OUT" 2>&1 | quiet | tee "$OUT/block_sweep.log"
# Profiled with CUDA graphs on, as timed (XLA runs kernels one by one under a profiler otherwise).
XLA_FLAGS="$FLAGS --xla_enable_command_buffers_during_profiling=true" timeout 100 python3 benchmarks/gpu_profile.py 512 \
  2>&1 | grep "ms/step" | head -16 | tee "$OUT/profile_ctx512.log"
timeout 40 python3 benchmarks/gpu_transfer_probe.py 2>&1 | quiet | tee "$OUT/transfer_probe.log"

#!/usr/bin/env bash
# Everything in benchmarks/gpu-h200.md in one call on a lent GPU machine (run from the repo root;
# logs and JSON land in $OUT; about 8 minutes on an H200 plus the machine's start), most wanted first,
# since a device call's 600 s limit cuts the tail if compiles run long:
# kernel + parity checks; nano-vllm's workload with layers under lax.scan (the default), with layers
# unrolled, and with the host waiting for every step; decode-step times with and without CUDA graphs;
# a profile. (The pure-JAX attention path, 2169 tok/s, is `NANOVLLM_JAX_ATTENTION=xla`: ~2 more minutes.)
# (benchmarks/gpu_kernel_sweep.py, which picked the kernel's launch settings, runs apart.)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# cuBLAS for every GEMM: compiling a dozen bucket programs stays short (no Triton GEMM autotuning).
FLAGS="--xla_gpu_enable_triton_gemm=false"
export XLA_FLAGS="$FLAGS"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "it/s]\|^WARNING\|^I0000\|^E0000\|^W0000"; }
WORKLOAD="--random-weights qwen3-0.6b --num-seqs 256 --min-input-len 100 --max-input-len 1024
  --min-output-len 100 --max-output-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192"
bench() {  # $1: async|sync (the host waits for every step), $2: name, $3: rounds; prints host time per step
  timeout 200 python3 benchmarks/async_ab.py $1 $WORKLOAD --rounds $3 --json "$OUT/bench_$2.json" 2>&1 | quiet | tail -5
}
decode_step() {  # $1: name, $2: context; NANOVLLM_JAX_LAYERS and XLA_FLAGS as set by the caller
  timeout 90 python3 benchmarks/decode_step.py --dtype bfloat16 --batch-sizes 256 --max-model-len 2048 \
    --context $2 --json "$OUT/decode_step_$1.json" 2>&1 | quiet | tail -1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__)"
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | quiet | tee "$OUT/check.log"
bench async scan 2
# Under lax.scan XLA runs each layer as one CUDA graph that it re-records every iteration (its six
# weight slices move with the layer); unrolled, a step is one graph of ~430 kernels and no weight
# copies (benchmarks/gpu_aot_census.py --graphs). Stop 10 timed an unrolled decode step slower.
NANOVLLM_JAX_LAYERS=unroll bench async unroll 1
bench sync scan_host_waits 1
for context in 16 1024; do decode_step ctx$context $context; done
NANOVLLM_JAX_LAYERS=unroll decode_step ctx16_unroll 16
XLA_FLAGS="$FLAGS --xla_gpu_enable_command_buffer=" decode_step ctx16_no_graphs 16
NANOVLLM_JAX_LAYERS=unroll XLA_FLAGS="$FLAGS --xla_gpu_enable_command_buffer=" decode_step ctx16_unroll_no_graphs 16
# Profiled with CUDA graphs on, as timed (XLA runs kernels one by one under a profiler otherwise).
XLA_FLAGS="$FLAGS --xla_enable_command_buffers_during_profiling=true" timeout 90 python3 benchmarks/gpu_profile.py 1024 \
  2>&1 | grep "ms/step" | head -16 | tee "$OUT/profile_ctx1024.log"

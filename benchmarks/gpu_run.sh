#!/usr/bin/env bash
# The GPU checks of benchmarks/gpu-h200.md in one call on a lent machine (run from the repo root; logs
# and JSON land in $OUT), most wanted first, since a device call's limit cuts the tail if compiles
# run long. Parts, named as arguments (default: check bench scan profile, about 6 minutes on an H200
# plus the machine's start):
#   check    kernel + parity checks (gpu_check.py)
#   bench    nano-vllm's workload over 3 rounds, with the host's time per step (async_ab.py)
#   scan     the same with layers under lax.scan (a host-driven loop of layer graphs; the default unrolls
#            them into one CUDA graph a step)
#   sweep    the kernel by KV block size (gpu_block_sweep.py)
#   profile  a decode step at 512-token contexts, kernel by kernel
#   probe    the host's put of a step (gpu_transfer_probe.py)
# (The pure-JAX attention path, 2169 tok/s in session 11, is `NANOVLLM_JAX_ATTENTION=xla`; the
# kernel's launch settings, `gpu_kernel_sweep.py OUT`.)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# cuBLAS for every GEMM: compiling a dozen bucket programs stays short (no Triton GEMM autotuning).
FLAGS="--xla_gpu_enable_triton_gemm=false"
export XLA_FLAGS="$FLAGS"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${*:-check bench scan profile}
quiet() { grep -v "it/s]\|^WARNING\|^I0000\|^E0000\|^W0000"; }
WORKLOAD="--random-weights qwen3-0.6b --num-seqs 256 --min-input-len 100 --max-input-len 1024
  --min-output-len 100 --max-output-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__)"
for part in $PARTS; do
  echo "== $part"
  case $part in
    check) timeout 120 python3 benchmarks/gpu_check.py 2>&1 | quiet | tee "$OUT/check.log" ;;
    bench) timeout 240 python3 benchmarks/async_ab.py async $WORKLOAD --rounds 3 --json "$OUT/bench.json" 2>&1 \
             | quiet | tail -8 ;;
    scan) NANOVLLM_JAX_LAYERS=scan timeout 200 python3 benchmarks/async_ab.py async $WORKLOAD --rounds 3 \
             --json "$OUT/bench_scan.json" 2>&1 | quiet | tail -8 ;;
    sweep) timeout 150 python3 benchmarks/gpu_block_sweep.py "$OUT" 2>&1 | quiet | tee "$OUT/block_sweep.log" ;;
    # Profiled with CUDA graphs on, as timed (XLA runs kernels one by one under a profiler otherwise).
    profile) XLA_FLAGS="$FLAGS --xla_enable_command_buffers_during_profiling=true" timeout 100 \
             python3 benchmarks/gpu_profile.py 512 2>&1 | grep "ms/step" | head -16 | tee "$OUT/profile_ctx512.log" ;;
    probe) timeout 40 python3 benchmarks/gpu_transfer_probe.py 2>&1 | quiet | tee "$OUT/transfer_probe.log" ;;
    *) echo "unknown part: $part (check bench scan sweep profile probe)"; exit 2 ;;
  esac
done

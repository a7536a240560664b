#!/usr/bin/env bash
# One call on a lent GPU machine (run from the repo root; logs and JSON land in $OUT):
# the kernel and parity checks, then nano-vllm's workload on a Qwen3-0.6B-shaped random model.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# cuBLAS for every GEMM: compiling a dozen bucket programs stays short (no Triton GEMM autotuning).
export XLA_FLAGS="--xla_gpu_enable_triton_gemm=false"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${CHECK_S:-180}" python3 benchmarks/gpu_check.py 2>&1 | grep -v "it/s]" | tee "$OUT/check.log"
bench() {  # $1: attention path, $2: seconds
  NANOVLLM_JAX_ATTENTION=$1 timeout "$2" python3 -c "import logging, runpy, sys; logging.basicConfig(level=logging.INFO); logging.getLogger('jax').setLevel(logging.WARNING)
sys.argv[0] = 'bench'; runpy.run_module('nanovllm_jax.bench', run_name='__main__')" --random-weights qwen3-0.6b \
    --num-seqs 256 --min-input-len 100 --max-input-len 1024 --min-output-len 100 --max-output-len 1024 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --json "$OUT/bench_$1.json" 2>&1 | grep -v "it/s]" | tee "$OUT/bench_$1.log"
}
bench pallas "${BENCH_S:-330}"
[ -s "$OUT/bench_pallas.json" ] || bench xla "${FALLBACK_S:-240}"

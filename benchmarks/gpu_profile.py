"""Device time per kernel of a 256-sequence decode step (Qwen3-0.6B shape, bf16), from a jax.profiler trace.

    python benchmarks/gpu_profile.py [CONTEXT_TOKENS]   (default 16)
"""
from __future__ import annotations

import collections
import glob
import sys
import tempfile

import jax

from decode_step import decode_batch, decode_runner  # beside this script

ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 16
runner, _ = decode_runner("qwen3-0.6b", 256, ctx, 2048, "bfloat16")
step = decode_batch(256, ctx, 16, -(-ctx // 16), runner.config.max_blocks_per_seq)
for _ in range(3):
    runner.execute(step)
trace_dir = tempfile.mkdtemp()
jax.profiler.start_trace(trace_dir)
for _ in range(5):
    runner.execute(step)
jax.profiler.stop_trace()
path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
data = jax.profiler.ProfileData.from_file(path)
totals, counts = collections.Counter(), collections.Counter()
for plane in data.planes:
    if "/device:GPU" not in plane.name:
        continue
    for line in plane.lines:
        for ev in line.events:
            totals[(line.name, ev.name[:60])] += ev.duration_ns / 5e6
            counts[(line.name, ev.name[:60])] += 1
for (ln, name), ms in totals.most_common(30):
    print(f"{ms:8.3f} ms/step {counts[(ln, name)] // 5:5d}x  {ln[:20]:20s} {name}")

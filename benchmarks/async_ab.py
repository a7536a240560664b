"""The bench with and without async scheduling, to compare on one machine:

    python benchmarks/async_ab.py sync|async BENCH_ARGS...

`sync` makes the JAX runner wait for each step's tokens inside submit, so the host schedules the
next step only after the device is done (the engine before async scheduling); `async` is the default.
"""
from __future__ import annotations

import sys

from nanovllm_jax import bench, jax_runner

mode, args = sys.argv[1], sys.argv[2:]
if mode == "sync":
    submit = jax_runner.JaxRunner.submit

    def waiting_submit(self, batch):
        pending = submit(self, batch)
        pending.out.token_ids.block_until_ready()
        return pending

    jax_runner.JaxRunner.submit = waiting_submit
elif mode != "async":
    sys.exit("mode must be sync or async")
bench.main(args)

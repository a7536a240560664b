"""The bench with and without async scheduling, to compare on one machine:

    python benchmarks/async_ab.py sync|async BENCH_ARGS...

`sync` makes the JAX runner wait for each step's tokens inside submit, so the host schedules the
next step only after the device is done (the engine before async scheduling); `async` is the default.
Both print where the host's time per step went: inside submit (packing, dispatch, and in `sync` the
wait) and waiting in result() for the tokens; the rest of a step is the engine's own work. In
`async`, submit also dispatches the previous step's sampler, which on GPU waits until the device
has run the previous forward (each lax.cond reads its predicate back): that wait is where the host
should spend its idle time, while the engine's own work overlaps the device.
"""
from __future__ import annotations

import sys
import time

from nanovllm_jax import bench, jax_runner

mode, args = sys.argv[1], sys.argv[2:]
if mode not in ("sync", "async"):
    sys.exit("mode must be sync or async")
spent = {"submit": 0.0, "result": 0.0, "steps": 0}
submit = jax_runner.JaxRunner.submit
result = jax_runner._Pending.result


def timed_submit(self, batch):
    start = time.perf_counter()
    pending = submit(self, batch)
    if mode == "sync":
        pending.sampled().token_ids.block_until_ready()
    spent["submit"] += time.perf_counter() - start
    spent["steps"] += 1
    return pending


def timed_result(self):
    start = time.perf_counter()
    output = result(self)
    spent["result"] += time.perf_counter() - start
    return output


jax_runner.JaxRunner.submit = timed_submit
jax_runner._Pending.result = timed_result
bench.main(args)
steps = max(spent["steps"], 1)
print(f"{mode}: {steps} steps (warm-up included); per step: submit {spent['submit'] / steps * 1e3:.2f} ms, "
      f"waiting for tokens {spent['result'] / steps * 1e3:.2f} ms")

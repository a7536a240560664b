"""How long the host is held handing a step's packed inputs (~0.3 MB of int32) to the GPU, with the
device idle and while it runs a long program: `jax.device_put` of a numpy array (what the runner
does) and its alternatives. A put that returns only once the running program is done would leave
the device idle while the host then dispatches the next step.

    python benchmarks/gpu_transfer_probe.py
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

packed = np.arange(80_000, dtype=np.int32)
device = jax.devices()[0]
size = 8192 if jax.default_backend() == "gpu" else 512  # elsewhere: a dry run
weights = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16) * 0.01


@jax.jit
def busy(m):  # ~30 ms of matrix products on an H200
    for _ in range(20):
        m = m @ weights
    return m


identity = jax.jit(lambda p: p + 0)
variants = {
    "device_put(numpy)": lambda: jax.device_put(packed),
    "jit call on numpy": lambda: identity(packed),
}
if jax.default_backend() == "gpu":  # host memory kinds of a GPU client
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    staged = jax.device_put(packed, pinned)
    variants["device_put(numpy, pinned_host)"] = lambda: jax.device_put(packed, pinned)
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    variants["pinned_host array -> device"] = lambda: jax.device_put(staged, on_device)
for name, put in list(variants.items()):
    try:
        jax.block_until_ready(put())
    except Exception as e:  # noqa: BLE001 - a variant this jax does not support
        print(f"{name}: {str(e).splitlines()[0][:150]}")
        del variants[name]
jax.block_until_ready(busy(weights))
print(f"{'variant':34s} {'idle ms':>8s} {'busy ms':>8s}   (host time in the call; median of 7)")
for name, put in variants.items():
    idle, loaded = [], []
    for _ in range(7):
        start = time.perf_counter()
        jax.block_until_ready(put())
        idle.append(time.perf_counter() - start)
        running = busy(weights)
        time.sleep(0.002)
        start = time.perf_counter()
        out = put()
        loaded.append(time.perf_counter() - start)
        jax.block_until_ready((running, out))
    print(f"{name:34s} {statistics.median(idle) * 1e3:8.3f} {statistics.median(loaded) * 1e3:8.3f}", flush=True)
start = time.perf_counter()
jax.block_until_ready(busy(weights))
print(f"the busy program alone: {(time.perf_counter() - start) * 1e3:.1f} ms")

import sys

import jax.numpy as jnp

from nanovllm_jax.hugepages import HUGE_PAGE, advise_huge_pages


def test_advises_only_large_cpu_arrays_and_keeps_their_values():
    big = jnp.arange(3 * HUGE_PAGE // 4, dtype=jnp.float32)  # 3 huge pages of bytes: >= 1 aligned inside
    small = jnp.ones((16,), jnp.float32)
    advised = advise_huge_pages({"big": big, "small": small, "not_an_array": 3})
    assert advised % HUGE_PAGE == 0 and advised <= big.nbytes
    if sys.platform.startswith("linux"):
        assert advised >= HUGE_PAGE
    assert float(big[-1]) == 3 * HUGE_PAGE // 4 - 1 and float(small.sum()) == 16

"""Transparent huge pages for large CPU buffers (Linux, best effort).

A CPU decode step streams every weight from memory; with 4 KiB pages that stream also walks the
page tables (one TLB miss per 4 KiB). Backing the weights and KV cache with 2 MiB pages makes the
streaming GEMMs faster (measured on the LM head: 10-15%). Where THP is in `madvise` mode the
process must ask, per range, which this does; MADV_COLLAPSE converts pages already touched.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import jax

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 1 << 21


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def advise_huge_pages(tree) -> int:
    """Back the 2 MiB-aligned interior of every CPU array in `tree` with huge pages; returns the
    bytes advised (0 where unsupported: no Linux, no THP, or not a CPU buffer)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    advised = 0
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array) or x.nbytes < 2 * HUGE_PAGE or x.devices().pop().platform != "cpu":
            continue
        address = x.unsafe_buffer_pointer()
        start = -(-address // HUGE_PAGE) * HUGE_PAGE
        length = (address + x.nbytes) // HUGE_PAGE * HUGE_PAGE - start
        if madvise(start, length, MADV_HUGEPAGE) == 0:
            madvise(start, length, MADV_COLLAPSE)  # fails harmlessly on kernels before 6.1
            advised += length
    return advised

"""Shape buckets: every step is padded up to one of a few fixed sizes, so a handful of programs
compiled at start-up serve the whole run."""
from __future__ import annotations


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """smallest, 2 * smallest, 4 * smallest, ... below `limit`, then `limit` itself."""
    sizes, n = [], smallest
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest bucket holding n."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


def step_buckets(max_tokens: int, max_seqs: int, smallest: int = 1) -> list[tuple[int, int]]:
    """(token bucket, sequence bucket) pairs. A step has no more sequences than tokens, so each token
    bucket carries one sequence bucket: the smallest holding min(tokens, max_seqs). Token buckets
    start at `smallest` even past max_tokens (the GPU kernel's dots need 16 rows)."""
    seq_sizes = buckets(max_seqs, smallest)
    return [(t, bucket_for(min(t, max_seqs), seq_sizes)) for t in buckets(max(max_tokens, smallest), smallest)]

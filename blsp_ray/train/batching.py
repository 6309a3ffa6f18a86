"""Length-bucketed micro-batches from a Ray Data shard: little compute goes to padding.

A pool of ``micro_batch_size * pool`` rows is read, sorted by length and cut into micro-batches
of similar lengths, whose order is then shuffled (so steps do not go short-to-long). Every worker
reads the same number of rows (Ray Train splits with ``equal=True``), so every worker yields the
same number of micro-batches: the collectives of each step line up.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def bucketed_batches(
    shard,
    micro_batch_size: int,
    pool: int,
    length_column: str,
    seed: int,
) -> Iterator[list[dict]]:
    """Yield micro-batches (lists of row dicts) from ``shard`` (a Ray ``DataIterator``)."""
    rng = np.random.default_rng(seed)
    for block in shard.iter_batches(batch_size=micro_batch_size * pool, batch_format="numpy", prefetch_batches=1):
        columns = list(block)
        n = len(block[length_column])
        order = np.argsort(np.asarray(block[length_column]), kind="stable")
        chunks = [order[i : i + micro_batch_size] for i in range(0, n, micro_batch_size)]
        for j in rng.permutation(len(chunks)):
            yield [{c: block[c][i] for c in columns} for i in chunks[j]]


def padding_fraction(lengths: list[int]) -> float:
    """Share of a right-padded [B, max_len] batch that is padding."""
    total = len(lengths) * max(lengths)
    return 1.0 - sum(lengths) / total if total else 0.0

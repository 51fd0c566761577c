"""Forward passes sharded over processes, the same number on every process.

Under ZeRO-3 every forward gathers each layer's parameters collectively: a process that runs one forward
fewer than the others leaves them waiting in a gather that never completes (a hang, not an error).
"""

from __future__ import annotations

import math

import numpy as np


def equal_count_batches(n_rows: int, rank: int, world: int, micro_batch: int,
                        max_batches: int | None = None) -> list[tuple[np.ndarray, bool]]:
    """This process's share of rows 0..n_rows−1 in micro-batches, as many batches on every process as the
    largest share needs (at most max_batches). Each item is (rows to run, keep): a process whose share is
    used up runs row 0 again as a stand-in, and drops its result (keep False)."""
    mine = np.array_split(np.arange(n_rows), world)[rank]
    count = math.ceil(math.ceil(n_rows / world) / micro_batch)
    if max_batches is not None:
        count = min(count, max_batches)
    batches = [mine[b * micro_batch:(b + 1) * micro_batch] for b in range(count)]
    return [(rows, True) if len(rows) else (np.zeros(1, dtype=mine.dtype), False) for rows in batches]

"""Seeded, disjoint splits: eval carved out of train, and each split cut into the three phases."""

from __future__ import annotations

import hashlib

import numpy as np


def _rng(seed: int, key: str) -> np.random.Generator:
    # The dataset name joins the seed so two datasets of equal size do not get the same permutation.
    return np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)])


def phase_counts(n: int, ratios) -> list[int]:
    """Split n items by ratios with the largest-remainder rule: each count is within one of n*r/sum(r)."""
    total = float(sum(ratios))
    exact = [n * r / total for r in ratios]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_phases(n: int, ratios, seed: int, key: str) -> list[np.ndarray]:
    """Indices 0..n-1 shuffled and cut into len(ratios) disjoint parts (sorted, for stable reading order)."""
    perm = _rng(seed, f"phases:{key}").permutation(n)
    bounds = np.cumsum([0] + phase_counts(n, ratios))
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def carve_eval(n: int, fraction: float, seed: int, key: str, max_eval: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices for a dataset that ships no eval split. Both non-empty when n >= 2."""
    n_eval = int(round(n * fraction))
    n_eval = min(max(n_eval, 1 if n >= 2 else 0), n - 1 if n >= 2 else 0)
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    perm = _rng(seed, f"eval:{key}").permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])

"""Seeded, disjoint splits grouped by prompt: eval carved out of train, and each split cut into the phases.

Records that share a normalised prompt form one group, and a group always lands whole on one side of
every cut, so no prompt is both trained on and evaluated (several pairs per question are common).
Groups are ordered by a seeded hash of their prompt and the order is cut where the record counts come
closest to the requested shares: with one record per prompt the shares are met exactly, with bigger
groups to within a group. The order depends on the prompts, not on the file order or the dataset name,
so a prompt that two datasets share tends to land on the same side in both.
"""

from __future__ import annotations

import hashlib

import numpy as np


def prompt_key(turns: list[dict]) -> str:
    """The prompt as grouping sees it: every turn's role and text, whitespace collapsed and case folded.

    Built from the parsed turns rather than the rendered text, so the split does not move when the
    tokenizer or chat template changes, and an hh transcript equals the same turns given as messages."""
    return "\n".join(f"{t['role']}: {' '.join(t['content'].split()).casefold()}" for t in turns)


def phase_counts(n: int, ratios) -> list[int]:
    """Split n items by ratios with the largest-remainder rule: each count is within one of n*r/sum(r)."""
    total = float(sum(ratios))
    exact = [n * r / total for r in ratios]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _groups_in_hash_order(keys: list[str], seed: int, purpose: str) -> list[np.ndarray]:
    """Record indices grouped by key, the groups ordered by sha256(seed, purpose, key)."""
    members: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    rank = {k: hashlib.sha256(f"{seed}\0{purpose}\0{k}".encode()).digest() for k in members}
    return [np.asarray(members[k]) for k in sorted(members, key=rank.__getitem__)]


def _nearest_boundary(cumulative: np.ndarray, target: float, lo: int, hi: int) -> int:
    """The group boundary b in [lo, hi] whose record count cumulative[b] is closest to target (lower on ties)."""
    candidates = np.arange(lo, hi + 1)
    return int(candidates[np.argmin(np.abs(cumulative[lo:hi + 1] - target))])


def _cut(groups: list[np.ndarray], boundaries: list[int]) -> list[np.ndarray]:
    edges = [0, *boundaries, len(groups)]
    return [np.sort(np.concatenate(groups[a:b])) if b > a else np.zeros(0, dtype=np.int64)
            for a, b in zip(edges[:-1], edges[1:])]


def split_phases(keys: list[str], ratios, seed: int) -> list[np.ndarray]:
    """Indices of the records (one prompt key each) cut into len(ratios) disjoint parts by ratio, whole
    prompt groups per part; a zero ratio gets nothing. Indices are sorted, for a stable reading order."""
    groups = _groups_in_hash_order(keys, seed, "phases")
    cumulative = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
    targets = np.cumsum(phase_counts(len(keys), ratios))[:-1]
    boundaries, lo = [], 0
    for t in targets:
        lo = _nearest_boundary(cumulative, t, lo, len(groups))
        boundaries.append(lo)
    return _cut(groups, boundaries)


def carve_eval(keys: list[str], fraction: float, seed: int, max_eval: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices for a dataset that ships no eval split, whole prompt groups on each side.
    Both are non-empty when there are at least two distinct prompts. `max_eval` caps the eval records
    (unless the first group alone is bigger: eval is never empty)."""
    groups = _groups_in_hash_order(keys, seed, "eval")
    if len(groups) < 2:
        return np.arange(len(keys)), np.zeros(0, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
    hi = len(groups) - 1
    if max_eval is not None:
        hi = max(1, min(hi, int(np.searchsorted(cumulative, max_eval, side="right")) - 1))
    b = _nearest_boundary(cumulative, len(keys) * fraction, 1, hi)
    evals, train = _cut(groups, [b])
    return train, evals

"""From prepared tables to padded tensor batches, with a deterministic, resumable step schedule.

The schedule fixes, for every optimizer step, the global set of rows; each rank takes its slice and cuts
it into micro-batches. Because the whole step is known up front, every rank can normalise its loss by
the *global* number of target tokens (or pairs) of the step, so 1 process and N processes compute the
same loss and gradient whatever the micro-batch split.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.table import TokenTable
from ..sequences import pad_right


class Blend:
    """Several datasets' tables of one phase/split as one sequence of rows."""

    def __init__(self, tables: list[TokenTable]):
        self.tables = [t for t in tables if len(t)]
        self._starts = np.cumsum([0] + [len(t) for t in self.tables])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row(self, i: int) -> dict:
        t = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.tables[t].row(int(i - self._starts[t]))


class StepSchedule:
    """Epoch-wise seeded shuffles cut into global batches (the last incomplete batch of an epoch is dropped)."""

    def __init__(self, n_rows: int, global_batch: int, seed: int, epochs: int = 1, max_steps: int | None = None):
        if n_rows < global_batch:
            raise ValueError(f"{n_rows} training rows are fewer than one global batch of {global_batch}")
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self.steps_per_epoch = n_rows // global_batch
        self.total_steps = self.steps_per_epoch * epochs if max_steps is None else max_steps

    def rows_for_step(self, step: int) -> np.ndarray:
        """Global row indices of optimizer step `step` (0-based); past the last epoch it keeps cycling."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return perm[k * self.global_batch:(k + 1) * self.global_batch]


def rank_micro_batches(rows: np.ndarray, rank: int, world: int, micro_batch: int) -> list[np.ndarray]:
    mine = np.array_split(rows, world)[rank]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def collate_sft(rows: list[dict], pad_id: int, response_only: bool = True) -> dict[str, torch.Tensor]:
    """input_ids [B,T], lengths [B], prompt_lens [B], loss_mask [B,T] over target positions."""
    ids, lengths = pad_right([r["input_ids"] for r in rows], pad_id)
    prompt_lens = torch.tensor([r["prompt_len"] for r in rows], dtype=torch.long)
    pos = torch.arange(ids.shape[1])[None, :]
    start = prompt_lens[:, None] if response_only else torch.ones_like(prompt_lens)[:, None]
    loss_mask = (pos >= start) & (pos < lengths[:, None])
    return {"input_ids": ids, "lengths": lengths, "prompt_lens": prompt_lens, "loss_mask": loss_mask}


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one batch of 2B, so one forward pass scores both."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ids, lengths = pad_right(seqs, pad_id)
    prompt_lens = torch.tensor([r["prompt_len"] for r in rows] * 2, dtype=torch.long)
    return {"input_ids": ids, "lengths": lengths, "prompt_lens": prompt_lens}


def count_sft_targets(rows: list[dict], response_only: bool = True) -> int:
    """Target tokens of an SFT batch (the normaliser of its token-mean loss)."""
    return sum(len(r["input_ids"]) - (r["prompt_len"] if response_only else 1) for r in rows)

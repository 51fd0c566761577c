"""The right-padded sequence layout every stage and the rollouts read: rows of real tokens followed by padding,
with every mask built from lengths (never from pad ids, which often equal EOS; GUIDE §2) and one definition of
where a sequence's score is read. It sits below train/, rollout/ and models/, which all use it."""

from __future__ import annotations

import numpy as np
import torch


def pad_right(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences → (input_ids [B, longest] padded with pad_id on the right, lengths [B])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: True on the first lengths[i] positions of row i."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def response_token_mask(prompt_lens: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: True on response tokens [prompt_len, length) of each row."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    return (pos >= prompt_lens[:, None]) & (pos < lengths[:, None])


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    """Where the score is read: the last real token of each row (its EOS when the response has one).

    The one definition used by RM training, RM evaluation, PPO rewards and the critic (GUIDE §2).
    """
    if (lengths < 1).any():
        raise ValueError("every sequence needs at least one token")
    return lengths - 1


def gather_last(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [B, T] → [B]: the value at each row's last real token."""
    return values.gather(1, last_token_index(lengths)[:, None]).squeeze(1)

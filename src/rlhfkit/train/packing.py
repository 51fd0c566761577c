"""Packed batches (sft.packing, rm.packing): a micro-batch's sequences share rows instead of each padding a row
of its own, so fewer positions go through the model.

Each sequence keeps its own positions, restarting at 0 where it starts, and attends only to itself: the model
is called with these position_ids, no attention mask and no KV cache (packed_inputs), and transformers builds a
block-diagonal causal mask from where the positions restart (masking_utils.find_packed_sequence_indices; flash
attention reads the same boundaries). A row's trailing padding is one more sequence nobody reads. Rows are as wide as the micro-batch's
longest sequence, so a packed batch never has more positions than the padded one, and it holds exactly the
padded batch's sequences: the loss, its normaliser and the gradients are the same (tests/test_packing.py).
Whether a model masks packed sequences this way is checked on the model itself (require_isolated_packing).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError


def packed_inputs(position_ids: torch.Tensor) -> dict:
    """A transformers backbone's keyword arguments for packed rows. transformers looks for restarting positions
    only without an attention mask and without a cache, and a model whose config has use_cache makes one
    unless told not to."""
    return {"position_ids": position_ids, "use_cache": False}


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices per row: longest first, each into the first row with room (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences → (input_ids [R, W], position_ids [R, W], where [S, 2]: the row and the column at which
    sequence i starts). W is the longest sequence; positions restart at 0 at every sequence and at the padding."""
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    rows = first_fit(lengths, width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    where = torch.zeros((len(seqs), 2), dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = lengths[i]
            ids[r, col:col + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            positions[r, col:col + n] = torch.arange(n)
            where[i] = torch.tensor([r, col])
            col += n
        positions[r, col:] = torch.arange(width - col)
    return ids, positions, where


def collate_sft_packed(rows: list[dict], pad_id: int, response_only: bool = True) -> dict[str, torch.Tensor]:
    """collate_sft's batch, packed: input_ids and position_ids [R, W], loss_mask [R, W] over the same target
    tokens (each sequence's response, or all its tokens but the first)."""
    ids, positions, where = pack([r["input_ids"] for r in rows], pad_id)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    for r, (row, col) in zip(rows, where.tolist()):
        start = r["prompt_len"] if response_only else 1
        loss_mask[row, col + start:col + len(r["input_ids"])] = True
    return {"input_ids": ids, "position_ids": positions, "loss_mask": loss_mask}


def collate_pairs_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_pairs' sequences (chosen rows, then rejected rows), packed: input_ids and position_ids [R, W], and
    ends [2B, 2], the row and column of each sequence's last token (where its score is read), in that order."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ids, positions, where = pack(seqs, pad_id)
    ends = where + torch.tensor([[0, len(s) - 1] for s in seqs], dtype=torch.long)
    return {"input_ids": ids, "position_ids": positions, "ends": ends}


@torch.no_grad()
def require_isolated_packing(backbone: torch.nn.Module, setting: str) -> None:
    """ConfigError unless the backbone computes the second of two packed sequences exactly as it computes it
    alone (to 1e-4): a model whose attention ignores restarting positions would let it see the first."""
    was_training = backbone.training
    backbone.eval()  # no dropout in the comparison
    device = next(backbone.parameters()).device
    ids = torch.tensor([[3, 5, 7, 11, 4, 6, 8, 10]], device=device)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
    alone = backbone(input_ids=ids[:, 4:]).last_hidden_state.float()
    packed = backbone(input_ids=ids, **packed_inputs(positions)).last_hidden_state[:, 4:].float()
    backbone.train(was_training)
    if not torch.allclose(alone, packed, rtol=0, atol=1e-4 * max(1.0, float(alone.abs().max()))):
        name = type(backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone).__name__
        raise ConfigError(f"{setting}: {name} lets a packed sequence attend to the one before it (its attention "
                          f"does not separate sequences where their positions restart), so packing would change "
                          f"the loss; set {setting}: false")

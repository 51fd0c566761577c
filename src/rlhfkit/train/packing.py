"""Packed batches (sft.packing, rm.packing): a micro-batch's sequences share rows instead of each padding a row
of its own, so fewer positions go through the model.

SFT: each sequence keeps its own positions, restarting at 0 where it starts, and attends only to itself: the
model is called with these position_ids, no attention mask and no KV cache (packed_inputs), and transformers
builds a block-diagonal causal mask from where the positions restart (masking_utils.find_packed_sequence_indices;
flash attention reads the same boundaries). A row's trailing padding is one more sequence nobody reads.

RM pairs: a pair's chosen and rejected sequences begin with the same conversation, so a pair is packed as one
unit, [shared prefix, rest of chosen, rest of rejected], and the prefix goes through the model once: the
rejected tokens attend to the prefix and to themselves, not to the chosen ones, and each part's positions
continue from the prefix (an explicit 4D mask, pair_attention). Each sequence computes exactly what it would
alone, at about 30% fewer positions on the quickstart's hh-rlhf pairs.

Rows are as wide as the micro-batch's longest sequence (or pair unit), so a packed batch never has more
positions than the padded one, and it holds exactly the padded batch's sequences: the loss, its normaliser and
the gradients are the same (tests/test_packing.py). Whether a model masks packed sequences this way is checked
on the model itself (require_isolated_packing).
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


def shared_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two sequences have in common, leaving each at least its last token of its own
    (where its score is read)."""
    n = min(len(a), len(b)) - 1
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else max(n, 0)


def collate_pairs_packed(rows: list[dict], pad_id: int, share_prefix: bool = True) -> dict[str, torch.Tensor]:
    """collate_pairs' sequences packed a pair to a unit, each pair's shared prefix once (module docstring):
    input_ids and position_ids [R, W], attention_mask [R, 1, W, W] (bool, True where a position may attend),
    and ends [2B, 2], the row and column of each sequence's last token (where its score is read): chosen
    sequences, then rejected ones, in row order. share_prefix=False computes both sequences whole (what
    sharing saves, in benchmarks/packing.py)."""
    chosen = [np.asarray(r["chosen_ids"]) for r in rows]
    rejected = [np.asarray(r["rejected_ids"]) for r in rows]
    shared = [shared_prefix_len(c, j) if share_prefix else 0 for c, j in zip(chosen, rejected)]
    units = [len(c) + len(j) - s for c, j, s in zip(chosen, rejected, shared)]
    width = max(units)
    layout = first_fit(units, width)
    ids = torch.full((len(layout), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    unit = torch.full((len(layout), width), -1, dtype=torch.long)  # the pair a position belongs to; -1: padding
    branch = torch.zeros((len(layout), width), dtype=torch.long)  # 0: shared prefix, 1: chosen, 2: rejected
    ends = torch.zeros((2 * len(rows), 2), dtype=torch.long)
    for r, members in enumerate(layout):
        col = 0
        for i in members:
            s, c, j = shared[i], chosen[i], rejected[i]
            for part, tokens, start in ((0, c[:s], 0), (1, c[s:], s), (2, j[s:], s)):
                n = len(tokens)
                ids[r, col:col + n] = torch.as_tensor(tokens, dtype=torch.long)
                positions[r, col:col + n] = torch.arange(start, start + n)
                unit[r, col:col + n], branch[r, col:col + n] = i, part
                col += n
            ends[i] = torch.tensor([r, col - len(j) + s - 1])
            ends[len(rows) + i] = torch.tensor([r, col - 1])
        positions[r, col:] = torch.arange(width - col)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": pair_attention(unit, branch), "ends": ends}


def pair_attention(unit: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """[R, 1, W, W] bool: a position attends to earlier (or the same) positions of its own unit that are in the
    shared prefix or in its own branch. Padding (unit -1) attends causally within the padding, which nobody reads."""
    width = unit.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_unit = unit[:, :, None] == unit[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal & same_unit & visible_branch)[:, None]


def attention_for(backbone: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A bool 4D mask as the backbone's attention takes it: SDPA reads bool masks; eager attention adds its mask
    to the scores, so it gets 0 where allowed and the dtype's minimum elsewhere."""
    if getattr(backbone.config, "_attn_implementation", "sdpa") != "eager":
        return mask
    dtype = backbone.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def pair_inputs(backbone: torch.nn.Module, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The backbone's keyword arguments for collate_pairs_packed's rows: a 4D mask transformers uses as it is."""
    return {"position_ids": position_ids, "attention_mask": attention_for(backbone, attention_mask), "use_cache": False}


@torch.no_grad()
def require_isolated_packing(backbone: torch.nn.Module, setting: str, pairs: bool = False) -> None:
    """ConfigError unless the backbone computes packed sequences exactly as it computes them alone (to 1e-4):
    a model whose attention ignores restarting positions would let a sequence see the one before it. With
    `pairs`, the check runs on collate_pairs_packed's rows: a model that does not take a 4D mask as given would
    let a rejected sequence see its chosen one."""
    was_training = backbone.training
    backbone.eval()  # no dropout in the comparison
    device = next(backbone.parameters()).device
    name = type(backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone).__name__
    if pairs:
        seqs = [[3, 5, 7, 11, 13], [3, 5, 4, 6], [9, 12, 8], [9, 14], [10, 6], [10, 2]]  # rows: pair 1; pairs 2, 3
        rows = [{"chosen_ids": np.array(c), "rejected_ids": np.array(r)} for c, r in zip(seqs[0::2], seqs[1::2])]
        batch = {k: v.to(device) for k, v in collate_pairs_packed(rows, 0).items()}
        hidden = backbone(input_ids=batch["input_ids"], **pair_inputs(backbone, batch["position_ids"],
                                                                      batch["attention_mask"])).last_hidden_state
        packed = hidden[batch["ends"][:, 0], batch["ends"][:, 1]].float()
        order = seqs[0::2] + seqs[1::2]
        alone = torch.cat([backbone(input_ids=torch.tensor([s], device=device)).last_hidden_state[:, -1] for s in order]).float()
        problem = "does not take a 4D attention mask as given (a rejected sequence would see its chosen one)"
    else:
        ids = torch.tensor([[3, 5, 7, 11, 4, 6, 8, 10]], device=device)
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
        alone = backbone(input_ids=ids[:, 4:]).last_hidden_state.float()
        packed = backbone(input_ids=ids, **packed_inputs(positions)).last_hidden_state[:, 4:].float()
        problem = ("lets a packed sequence attend to the one before it (its attention does not separate sequences "
                   "where their positions restart)")
    backbone.train(was_training)
    if not torch.allclose(alone, packed, rtol=0, atol=1e-4 * max(1.0, float(alone.abs().max()))):
        raise ConfigError(f"{setting}: {name} {problem}, so packing would change the loss; set {setting}: false")

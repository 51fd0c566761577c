"""A training engine's full weights in one piece: gathered from every process under ZeRO-3, LoRA merged in
when asked. Checkpoint exports, the rollout copy of the actor and its EMA all read the weights this way."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..models.lora import merge_lora_state_dict
from .backend import TrainEngine


def gathered_weights(engine: TrainEngine, t: TrainConfig, prefix: str = "", merge: bool | None = None,
                     all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights (names under `prefix`, prefix removed) on rank 0, or on every rank with all_ranks.
    LoRA is merged in when `merge` (default: when the stage saves merged weights)."""
    sd = engine.full_state_dict(all_ranks)
    if sd is not None and prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if merge is None:
        merge = t.lora.save == "merged"
    if sd is not None and t.lora.enabled and merge:
        sd = merge_lora_state_dict(sd, t.lora.alpha / t.lora.r)
    return sd

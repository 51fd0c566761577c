"""Stage 1, supervised fine-tuning: next-token loss on response tokens (prompt masked) of phase-1 data.

Eval reports the loss and perplexity on the phase-1 eval split before, during and after training.
"""

from __future__ import annotations

import math

import torch

from ..config import Config
from ..models.loading import load_tokenizer
from .batching import collate_sft, count_sft_targets
from .common import begin_stage, save_causal_lm, stage_data, trainable_causal_lm
from .budget import StageBudget
from .loop import Stage, run_stage
from .losses import backbone_and_head
from .packing import collate_sft_packed, require_isolated_packing
from .stage_dirs import sft_stage_dir


def run_sft(cfg: Config, show_progress: bool = True, budget: StageBudget | None = None) -> dict:
    cfg = begin_stage(cfg, sft_stage_dir(cfg), "sft")
    t = cfg.sft
    train, evals, pad_id = stage_data(cfg, 1, show_progress)
    tokenizer = load_tokenizer(cfg.model)
    model, groups = trainable_causal_lm(cfg.model, t)
    response_only = t.loss_on == "response"
    packing = t.packing
    if packing:
        require_isolated_packing(backbone_and_head(model.lm)[0], "sft.packing")
    collate = collate_sft_packed if packing else collate_sft

    stage = Stage(
        name="sft",
        train=train,
        eval=evals,
        collate=lambda rows: collate(rows, pad_id, response_only),
        units=lambda rows: count_sft_targets(rows, response_only),
        loss=lambda engine, batch: (sft_batch_loss(engine, batch, engine.device), {}),
        export=lambda engine, out: save_causal_lm(engine, tokenizer, out, t),
        eval_metrics=lambda s: {"eval/perplexity": math.exp(min(s["loss"] / max(s["units"], 1), 50.0))},
        tokens=lambda rows: sum(len(r["input_ids"]) for r in rows),
    )
    return run_stage(stage, t, model, groups, sft_stage_dir(cfg), show_progress, cfg.model_dump(mode="json"), budget)


def sft_batch_loss(forward, batch: dict, device) -> torch.Tensor:
    """Summed NLL of a batch's target tokens, padded (collate_sft) or packed (collate_sft_packed).
    forward: the engine or a TokenLogprobLM."""
    ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    if "position_ids" in batch:
        logprobs, _ = forward(ids, None, mask, position_ids=batch["position_ids"].to(device))
    else:
        logprobs, _ = forward(ids, batch["lengths"].to(device), mask)
    return -logprobs.sum()

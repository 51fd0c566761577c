"""Stage 1, supervised fine-tuning: next-token loss on response tokens (prompt masked) of phase-1 data.

Eval reports the loss and perplexity on the phase-1 eval split before, during and after training.
"""

from __future__ import annotations

import math

from ..config import Config
from ..models.loading import load_tokenizer
from .batching import collate_sft, count_sft_targets
from .common import begin_stage, save_causal_lm, stage_data, trainable_causal_lm
from .budget import StageBudget
from .loop import Stage, run_stage
from .stage_dirs import sft_stage_dir


def run_sft(cfg: Config, show_progress: bool = True, budget: StageBudget | None = None) -> dict:
    cfg = begin_stage(cfg, sft_stage_dir(cfg), "sft")
    t = cfg.sft
    train, evals, pad_id = stage_data(cfg, 1, show_progress)
    tokenizer = load_tokenizer(cfg.model)
    model, groups = trainable_causal_lm(cfg.model, t)
    response_only = t.loss_on == "response"

    def loss(engine, batch):
        ids, lengths = batch["input_ids"].to(engine.device), batch["lengths"].to(engine.device)
        logprobs, _ = engine(ids, lengths, batch["loss_mask"].to(engine.device))
        return -logprobs.sum(), {}

    stage = Stage(
        name="sft",
        train=train,
        eval=evals,
        collate=lambda rows: collate_sft(rows, pad_id, response_only),
        units=lambda rows: count_sft_targets(rows, response_only),
        loss=loss,
        export=lambda engine, out: save_causal_lm(engine, tokenizer, out, t),
        eval_metrics=lambda s: {"eval/perplexity": math.exp(min(s["loss"] / max(s["units"], 1), 50.0))},
        tokens=lambda rows: sum(len(r["input_ids"]) for r in rows),
    )
    return run_stage(stage, t, model, groups, sft_stage_dir(cfg), show_progress, cfg.model_dump(mode="json"), budget)

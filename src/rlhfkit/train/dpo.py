"""DPO, the single-step alternative to RM + PPO: the policy learns from phase-2 pairs directly against a
frozen reference (a frozen copy of the starting model, or, under LoRA, the same model with its adapter off).
Eval reports the DPO loss and implicit-reward accuracy.

Dropout is off (TRL's disable_dropout): the loss compares the policy's log-probs with the reference's, and
dropout would add noise to both; the reference pass never has it, and the policy only if dpo.dropout
asks for it."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import Config
from ..models.loading import load_causal_lm, load_tokenizer
from ..models.configs import model_config_for
from ..sequences import response_token_mask
from .common import TokenLogprobLM, begin_stage, pair_stage, save_causal_lm, stage_data, trainable_causal_lm
from .budget import StageBudget
from .loop import run_stage
from .losses import dpo_loss
from .stage_dirs import dpo_stage_dir
from .starts import dpo_start_model


def frozen_reference(mcfg, dtype: str) -> TokenLogprobLM:
    """The starting model, frozen, at the policy's precision: loading casts its weights only (the rotary
    buffers stay fp32, as in the trained policy), so at step 0 it is exactly the policy's function."""
    return TokenLogprobLM(load_causal_lm(mcfg, dtype=dtype)).eval().requires_grad_(False)


def dpo_policy(mcfg, t) -> tuple[TokenLogprobLM, list[dict]]:
    """The trainable policy, with dropout 0 unless dpo.dropout sets another value."""
    return trainable_causal_lm(mcfg, t if t.dropout is not None else t.model_copy(update={"dropout": 0.0}))


@contextmanager
def eval_mode(module: torch.nn.Module):
    """module.eval() for the block (no dropout anywhere, whatever the model implements it with), then the
    mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def reference_logprobs(engine, reference: TokenLogprobLM | None, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's summed response log-probs of the chosen and the rejected rows: the frozen copy (in
    eval mode), or under LoRA the policy itself with its adapter off, run in eval mode."""
    if reference is not None:
        return pair_logprobs(reference.to(engine.device), batch, engine.device)
    with engine.module.lm.disable_adapter(), eval_mode(engine.module):
        return pair_logprobs(engine, batch, engine.device)


def pair_logprobs(forward, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen rows and of the rejected rows.

    forward(input_ids, lengths, target_mask) -> (logprobs, rows): the engine, or a frozen TokenLogprobLM.
    """
    ids, lengths = batch["input_ids"].to(device), batch["lengths"].to(device)
    mask = response_token_mask(batch["prompt_lens"].to(device), lengths, ids.shape[1])
    logprobs, rows = forward(ids, lengths, mask)
    per_row = torch.zeros(ids.shape[0], device=device, dtype=logprobs.dtype).index_add_(0, rows, logprobs)
    half = ids.shape[0] // 2
    return per_row[:half], per_row[half:]


def run_dpo(cfg: Config, show_progress: bool = True, budget: StageBudget | None = None) -> dict:
    out_dir = dpo_stage_dir(cfg)
    cfg = begin_stage(cfg, out_dir, "dpo")
    t = cfg.dpo
    train, evals, pad_id = stage_data(cfg, 2, show_progress)
    mcfg = model_config_for(cfg, dpo_start_model(cfg))
    tokenizer = load_tokenizer(mcfg)
    model, groups = dpo_policy(mcfg, t)
    reference = None if t.lora.enabled else frozen_reference(mcfg, t.dtype)

    def loss(engine, batch):
        ref_c, ref_r = reference_logprobs(engine, reference, batch)
        pol_c, pol_r = pair_logprobs(engine, batch, engine.device)
        mean, stats = dpo_loss(pol_c, pol_r, ref_c, ref_r, t.beta, t.label_smoothing)
        n = pol_c.shape[0]
        return mean * n, {k: v * n for k, v in stats.items()}

    stage = pair_stage("dpo", train, evals, pad_id, loss, lambda engine, out: save_causal_lm(engine, tokenizer, out, t),
                       ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected"))
    return run_stage(stage, t, model, groups, out_dir, show_progress, cfg.model_dump(mode="json"), budget)



"""Experience: from a batch of rollouts to PPO training targets, with the four models and formulas.py.

old log-probs (actor, dropout off), reference log-probs, critic values, RM scores → shaped scores →
per-token rewards (−β·KL + score at the last response token) → GAE advantages and returns → whitened
advantages (over all processes' valid tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import PPOConfig
from ...engine import distributed as D
from ...rollout.sampling import Rollout, select_rows
from ...rollout.scoring import actor_logprobs, critic_values
from . import formulas as PF


@dataclass
class Experience:
    rollout: Rollout  # on CPU
    scores: torch.Tensor  # [B] raw RM scores
    shaped_scores: torch.Tensor  # [B] after normalisation, missing-EOS penalty and clipping
    old_logprobs: torch.Tensor  # [B, R] (the rest likewise, zero on padding)
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@torch.no_grad()
def make_experience(r: Rollout, actor, reference, critic, score, p: PPOConfig, kl_coef: float,
                    score_stats: tuple[float, float] | None, micro_batch: int, device) -> Experience:
    """Run the four models over the rollouts in micro-batches and derive the PPO targets. Rollouts that
    carry the sampler's log-probs (an exact copy of the actor sampled them) skip the actor forward."""
    width = r.width
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("lp", "ref", "v", "s")}
    for start in range(0, len(r.lengths), micro_batch):
        sub = select_rows(r, torch.arange(start, min(start + micro_batch, len(r.lengths)))).to(device)
        grow = (0, width - sub.width)
        old = sub.logprobs if sub.logprobs is not None else actor_logprobs(actor, sub, p.sampling.temperature)
        parts["lp"].append(F.pad(old, grow).cpu())
        parts["ref"].append(F.pad(actor_logprobs(reference, sub, p.sampling.temperature), grow).cpu())
        parts["v"].append(F.pad(critic_values(critic, sub), grow).cpu())
        parts["s"].append(score(sub).cpu())
    logprobs, ref_logprobs, values, scores = (torch.cat(parts[k]) for k in ("lp", "ref", "v", "s"))

    mean, std = score_stats if score_stats else (None, None)
    shaped = PF.normalize_and_clip_scores(scores, mean, std)
    shaped = PF.length_penalty_scores(shaped, r.ended, p.missing_eos_penalty)
    shaped = PF.normalize_and_clip_scores(shaped, clip=p.score_clip)
    rewards, kl = PF.compute_rewards(shaped, logprobs, ref_logprobs, r.response_lengths, kl_coef, p.kl_estimator)
    advantages, returns = PF.gae_advantages(values, rewards, r.response_lengths, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = whiten_over_ranks(advantages, r.response_mask())
    return Experience(r, scores, shaped, logprobs, ref_logprobs, values, kl, rewards, advantages, returns)


def masked_moments_over_ranks(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased variance of x's valid entries over every process (two passes, float64); the
    variance is 0 with fewer than two entries, as in formulas.masked_var."""
    n, s = D.all_reduce_sum([float(mask.sum()), float(torch.where(mask, x, 0.0).double().sum())])
    mean = s / max(n, 1)
    (ss,) = D.all_reduce_sum([float(torch.where(mask, (x.double() - mean) ** 2, 0.0).sum())])
    return mean, ss / max(n - 1, 1)


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """formulas.masked_whiten with the statistics of every process's valid tokens, so N processes whiten
    exactly as one process holding the whole batch would."""
    mean, var = masked_moments_over_ranks(x, mask)
    return torch.where(mask, (x - mean) * (var + 1e-8) ** -0.5, 0.0)


def explained_variance_over_ranks(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """formulas.explained_variance over every process's valid tokens (0.0 when the returns do not vary)."""
    var_returns = masked_moments_over_ranks(returns, mask)[1]
    if var_returns == 0.0:
        return 0.0
    return 1.0 - masked_moments_over_ranks(returns - values, mask)[1] / var_returns

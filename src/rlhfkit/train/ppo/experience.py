"""Experience: from a batch of rollouts and their rewards to RL training targets.

old log-probs (actor, dropout off), reference log-probs (unless the KL is off), critic values (gae only),
the reward → shaped scores (missing-EOS penalty, clip) → advantages by ppo.advantage:

  gae                    per-token rewards (−β·KL + score at the last token) → GAE → whitened (PPO)
  grpo, dr_grpo, rloo    the score → group baseline, then −β·Σ_{k≥t} KL_k per token (KL in the reward)
  reinforce_pp           per-token rewards → returns → whitened over the whole batch (REINFORCE++)
  reinforce_pp_baseline  the score minus its group's mean, then as reinforce_pp

Rows come in groups of n_samples_per_prompt consecutive responses to one prompt; a process holds whole
groups, so group baselines need no communication while batch statistics are taken over every process.

In multi-turn episodes (rollout/episodes.py) a response also holds what tools or the environment added,
and its action mask marks the model's own tokens. The targets are computed on the model's tokens alone, each
row's gathered to its front (OwnTokens), so the formulas see the episode as the sequence of the model's
actions: the score on its last token, the KL of its tokens, GAE's next value the one of its next token
(whatever was added in between); then spread back to the response positions, 0 on the added ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import PPOConfig
from ...engine import distributed as D
from ...rollout.sampling import Rollout, select_rows
from ...rollout.scoring import actor_logprobs, critic_values
from ...sequences import length_mask
from . import formulas as PF

# The sampler's log-probs stand in for the actor's old log-probs only while no token's differs by more than
# this. KV-cached decoding and the trainer's full right-padded forward round differently: measured max
# |Δlogp| per token (docs/algorithms.md, "Reusing the sampler's log-probs"): 1e-6 (tiny model) and 2.2e-5
# (SmolLM2-135M) in fp32, 2e-3 and 0.28 in bf16. 1e-3 is 45× fp32's largest gap and under 1% of a 0.2 ratio
# clip's log-width (0.18): fp32 reuses, bf16 recomputes (as verl and OpenRLHF always do).
LOGP_REUSE_MAX_ABS_DIFF = 1e-3
LOGP_REUSE_CHECK_EVERY = 10  # the gap is checked on steps 0, 10, 20, ... (by step number, so resume is exact)


@dataclass
class Experience:
    rollout: Rollout  # on CPU
    scores: torch.Tensor  # [B] the weighted reward (the model's part normalised when configured)
    shaped_scores: torch.Tensor  # [B] after the missing-EOS penalty and clipping
    old_logprobs: torch.Tensor  # [B, R] (the rest likewise, zero on padding)
    ref_logprobs: torch.Tensor | None  # None when the KL is off
    old_values: torch.Tensor | None  # None without a critic
    kl: torch.Tensor  # [B, R] the KL estimate (0 when off)
    advantages: torch.Tensor
    returns: torch.Tensor | None  # the critic's targets (gae only)
    keep: torch.Tensor  # [B] bool: rows that train (dynamic sampling drops groups without signal)
    logp_gap: tuple[float, float] | None = None  # max and mean |sampler − actor| log-prob per token, if measured


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, p: PPOConfig) -> torch.Tensor:
    """The missing-EOS penalty, then the clip (the model's normalisation came before, in RewardSum)."""
    shaped = PF.length_penalty_scores(scores, ended, p.missing_eos_penalty)
    return PF.normalize_and_clip_scores(shaped, clip=p.score_clip)


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: rows of groups whose rewards are not all equal (dynamic sampling, DAPO)."""
    g = scores.view(-1, group_size)
    return (g.amax(1) > g.amin(1)).repeat_interleave(group_size)


@torch.no_grad()
def make_experience(r: Rollout, scores: torch.Tensor, actor, reference, critic, p: PPOConfig, kl_coef: float,
                    micro_batch: int, device, reuse: bool = True, check: bool = False) -> Experience:
    """Run the models over the rollouts in micro-batches and derive the targets of ppo.advantage.
    Rollouts that carry the sampler's log-probs may skip the actor forward (`reuse`: an exact copy of the
    actor sampled them); with `check`, or without `reuse`, the actor runs anyway and the gap between the two
    is measured (logp_gap), and reused only below LOGP_REUSE_MAX_ABS_DIFF. Without KL the reference is not
    run, without a critic no values are computed."""
    width, n = r.width, p.n_samples_per_prompt
    use_ref = p.kl_mode != "off"
    parts: dict[str, list[torch.Tensor]] = {"lp": [], "ref": [], "v": []}
    for start in range(0, len(r.lengths), micro_batch):
        sub = select_rows(r, torch.arange(start, min(start + micro_batch, len(r.lengths)))).to(device)
        grow = (0, width - sub.width)
        if sub.logprobs is None or not reuse or check:
            parts["lp"].append(F.pad(actor_logprobs(actor, sub, p.sampling.temperature), grow).cpu())
        if use_ref:
            parts["ref"].append(F.pad(actor_logprobs(reference, sub, p.sampling.temperature), grow).cpu())
        if critic is not None:
            parts["v"].append(F.pad(critic_values(critic, sub), grow).cpu())
    logprobs, gap = old_logprobs(r, torch.cat(parts["lp"]) if parts["lp"] else None, reuse)
    ref_logprobs = torch.cat(parts["ref"]) if use_ref else None
    values = torch.cat(parts["v"]) if critic is not None else None
    own = OwnTokens(r.response_mask()) if r.action_mask is not None else None
    if own is not None:  # the model's tokens only, each row's at its front
        logprobs, ref_logprobs, values = (None if x is None else own.gather(x) for x in (logprobs, ref_logprobs, values))
        mask, lengths = length_mask(own.lengths, own.width), own.lengths
    else:
        mask, lengths = r.response_mask(), r.response_lengths
    shaped = shape_scores(scores, r.ended, p)
    beta = kl_coef if p.kl_mode == "reward" else 0.0  # the KL in the reward; as a loss it is the trainer's
    ref_or_self = ref_logprobs if use_ref else logprobs  # KL 0 when off

    def rewards_with_kl(score):
        return PF.compute_rewards(score, logprobs, ref_or_self, lengths, beta, p.kl_estimator_used)

    kl = PF.compute_rewards(shaped, logprobs, ref_or_self, lengths, 0.0, p.kl_estimator_used)[1]
    keep = groups_with_signal(shaped, n) if p.dynamic_sampling else torch.ones(len(shaped), dtype=torch.bool)
    returns = None
    if p.advantage == "gae":
        rewards = rewards_with_kl(shaped)[0]
        advantages, returns = PF.gae_advantages(values, rewards, lengths, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten_over_ranks(advantages, mask & keep[:, None])
    elif p.advantage in ("grpo", "dr_grpo", "rloo"):
        # The task score is normalised within its group first and the KL joins per token after (OpenRLHF):
        # folded into the score, grpo's std division would blow the KL's spread up in groups of equal scores.
        group = PF.group_advantages(shaped.view(-1, n), p.advantage).flatten()
        advantages = PF.reinforce_returns(rewards_with_kl(group)[0], lengths, 1.0)  # A_i − β·Σ_{k≥t} KL_k
    else:  # reinforce_pp, reinforce_pp_baseline
        if p.advantage == "reinforce_pp_baseline":
            shaped_for_return = PF.group_advantages(shaped.view(-1, n), p.advantage).flatten()
        else:
            shaped_for_return = shaped
        rewards = rewards_with_kl(shaped_for_return)[0]
        advantages = whiten_over_ranks(PF.reinforce_returns(rewards, lengths, p.gamma), mask & keep[:, None])
    if own is not None:  # back to the response positions
        logprobs, ref_logprobs, values, kl, advantages, returns = (
            None if x is None else own.spread(x) for x in (logprobs, ref_logprobs, values, kl, advantages, returns))
    return Experience(r, scores, shaped, logprobs, ref_logprobs, values, kl, advantages, returns, keep, gap)


class OwnTokens:
    """The model's own tokens of each row of a [B, R] response tensor, gathered to the row's front in order
    (`gather`, [B, width]: row i's first lengths[i] entries are its own tokens, then filler the formulas mask
    by length) and spread back (`spread`, [B, R]: 0 on every other position)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # own positions first, in order
        self.lengths = mask.sum(1)
        self.width = int(self.lengths.max()) if len(self.lengths) else 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, self.order[:, :self.width])

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.mask.shape, dtype=x.dtype).scatter(1, self.order[:, :self.width], x)
        return torch.where(self.mask, out, 0.0)


def old_logprobs(r: Rollout, recomputed: torch.Tensor | None, reuse: bool):
    """(the old log-probs [B, R], the (max, mean) sampler–actor gap over every process or None): the
    sampler's when reused and either unchecked or within LOGP_REUSE_MAX_ABS_DIFF, else the actor's."""
    if recomputed is None:
        return F.pad(r.logprobs, (0, r.width - r.logprobs.shape[1])), None
    if r.logprobs is None:
        return recomputed, None
    sampled = F.pad(r.logprobs, (0, r.width - r.logprobs.shape[1]))
    gap = logprob_gap(sampled, recomputed, r.response_mask())
    return (sampled if reuse and gap[0] <= LOGP_REUSE_MAX_ABS_DIFF else recomputed), gap


def logprob_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Max and mean |a − b| over the valid tokens of every process (the same decision on every rank)."""
    diff = torch.where(mask, (a - b).abs(), 0.0)
    top = max(D.all_gather_object(float(diff.max()) if diff.numel() else 0.0))
    total, count = D.all_reduce_sum([float(diff.sum()), float(mask.sum())])
    return top, total / max(count, 1.0)


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

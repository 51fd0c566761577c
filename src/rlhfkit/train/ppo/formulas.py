"""PPO math for RLHF as pure functions over tensors, each unit-tested against hand-computed numbers.

Follows InstructGPT (Ouyang et al. 2022), Ziegler et al. 2019 and "The N implementation details of
RLHF with PPO" (Huang et al.); metric names follow TRL.

Conventions: every per-token tensor is over the RESPONSE positions only, shape [B, R] with R the
longest response in the batch; row i has `response_lengths[i]` real tokens, then padding. Masks are
built from lengths, never from token ids (pad == eos in many tokenizers). A row of length 0 is
allowed: it is all padding and must not produce NaN. Whatever sits in padding positions (garbage
values, NaN) never leaks into a result.
"""

from __future__ import annotations

import math

import torch

from ...sequences import length_mask

KL_ESTIMATORS = ("k1", "k3", "abs", "mse")
GROUP_METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LOG_RATIO_MAX = 20.0  # |log-ratio| before any exp: e^20 ≈ 4.9e8 is finite in fp32 (e^89 is not)
K3_MAX = 10.0  # k3 is capped here, as verl does: one token far off the reference cannot dominate the loss


def _response_mask(response_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool from lengths; rejects lengths outside [0, width]."""
    if ((response_lengths < 0) | (response_lengths > width)).any():
        raise ValueError(f"response_lengths must lie in [0, {width}], got {response_lengths.tolist()}")
    return length_mask(response_lengths, width)


# --- KL penalty and rewards -----------------------------------------------------------------------

def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled by π (Schulman, "Approximating KL divergence").

    k1  = log π − log π_ref                      (unbiased, can be negative)
    k3  = (r − 1) − log r,  r = π_ref / π        (unbiased, always ≥ 0, lower variance; capped at K3_MAX)
    abs = |k1|,  mse = ½·k1²                     (as in TRL)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        d = (-log_ratio).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)  # log r; e^d stays finite
        return (torch.expm1(d) - d).clamp(max=K3_MAX)  # expm1 keeps (r − 1) exact when r ≈ 1
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    response_lengths: torch.Tensor, kl_coef: float,
                    estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT / Ziegler et al. per-token reward: r_t = −β·KL_t, plus the RM score at the last token.

    scores [B] (already normalised/clipped) land at index response_lengths − 1, the response's EOS when
    it has one; a row of length 0 gets no score. Returns (rewards [B, R], kl [B, R]), both 0 on padding;
    kl is exactly the estimate used in the reward, so it is what gets logged as objective/kl.
    """
    mask = _response_mask(response_lengths, logprobs.shape[1])
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
    rewards = -kl_coef * kl
    has_token = response_lengths > 0
    last = (response_lengths - 1).clamp(min=0)
    score = torch.where(has_token, scores.to(rewards.dtype), 0.0)
    rewards = rewards.scatter_add(1, last[:, None], score[:, None])
    return rewards, kl


def kl_loss_term(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                 estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate [B, R] kept differentiable in log π, for KL as a loss term (GRPO,
    Shao et al. 2024, uses k3: π_ref/π − log(π_ref/π) − 1, whose gradient in log π is 1 − π_ref/π).

    Same estimators as kl_penalty (Schulman, "Approximating KL divergence"); 0 on padding, whose log-ratios
    are zeroed before any exp so garbage there cannot become NaN. k3 (kl_penalty) clamps the log-ratio to
    ±LOG_RATIO_MAX before expm1 and caps k3 at K3_MAX, as verl does: no gradient beyond either.
    Its gradient in expectation is that of the forward KL(π_ref ‖ π), not of KL(π ‖ π_ref); mse's (k2) is the
    reverse KL's (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL").
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - ref_logprobs, 0.0)
    kl = kl_penalty(log_ratio, torch.zeros_like(log_ratio), estimator)
    return torch.where(mask, kl, 0.0)


# --- Masked statistics ----------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over entries where mask is True (along dim, or over everything); 0 where nothing is valid."""
    mask = mask.bool()
    total = torch.where(mask, x, 0.0)
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over valid entries; unbiased uses Bessel's n/(n−1).

    0 when fewer than two entries are valid (no spread can be estimated) instead of NaN.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)  # n = 1 gives var 0 · 1, n = 0 gives 0
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over valid entries (advantage normalisation, "N details" #7).

    shift_mean=False adds the mean back (only the scale changes, as TRL does for rewards).
    Invalid entries of the result are 0.
    """
    mask = mask.bool()
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


# --- Generalised advantage estimation -------------------------------------------------------------

@torch.no_grad()
def gae_advantages(values: torch.Tensor, rewards: torch.Tensor, response_lengths: torch.Tensor,
                   gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over response tokens only; training targets, so computed without grad.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns_t = A_t + V_t.
    The episode ends at the last valid token: V beyond it is 0 (no bootstrap from padding).
    Returns (advantages [B, R], returns [B, R]), 0 on padding.
    """
    batch, width = values.shape
    mask = _response_mask(response_lengths, width)
    values = torch.where(mask, values, 0.0)
    rewards = torch.where(mask, rewards, 0.0)
    next_values = torch.cat([values[:, 1:], values.new_zeros(batch, 1)], dim=1)  # V_{t+1}; 0 past the end
    deltas = rewards + gamma * next_values - values  # 0 on padding
    advantages = torch.zeros_like(values)
    running = values.new_zeros(batch)
    for t in reversed(range(width)):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(mask, advantages, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


# --- Critic-free advantages (groups of responses per prompt, REINFORCE++) -------------------------

def group_advantages(scores: torch.Tensor, method: str, eps: float = 1e-6) -> torch.Tensor:
    """Sequence-level advantages from a group's own scores: scores [G, n] (n responses to each of G prompts).

    grpo (DeepSeekMath, Shao et al. 2024):   A_i = (r_i − mean) / (std + eps), std unbiased (torch.std: TRL, verl)
    dr_grpo (Liu et al. 2025, "Understanding R1-Zero-like training"):  A_i = r_i − mean
    rloo (Ahmadian et al. 2024):             A_i = r_i − mean_{j≠i} r_j = n/(n−1)·(r_i − mean)
    reinforce_pp_baseline (Hu et al. 2025):  A_i = r_i − mean (the batch whitening comes later)
    A group of 1 has no baseline and a group of equal scores no signal: both give exactly 0, never NaN.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown group advantage {method!r}; expected one of {GROUP_METHODS}")
    scores = scores if scores.is_floating_point() else scores.float()
    n = scores.shape[1]
    if n < 2:
        return torch.zeros_like(scores)
    centered = scores - scores.mean(1, keepdim=True)
    same = (scores == scores[:, :1]).all(1, keepdim=True)
    centered = torch.where(same, 0.0, centered)  # the mean of equal floats can be off by an ulp
    if method == "grpo":
        return centered / (scores.std(1, keepdim=True) + eps)
    if method == "rloo":
        return centered * (n / (n - 1))
    return centered


def token_level(advantages: torch.Tensor, response_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Broadcast sequence advantages [B] to every valid response token: A_{i,t} = A_i for t < len_i, else 0.

    The outcome-reward form used by GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024); [B, width].
    """
    mask = _response_mask(response_lengths, width)
    return torch.where(mask, advantages[:, None], 0.0)


@torch.no_grad()
def reinforce_returns(rewards: torch.Tensor, response_lengths: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025) returns: G_t = Σ_{k≥t} γ^{k−t}·r_k over the valid tokens, 0 on padding.

    rewards [B, R] are compute_rewards' per-token rewards (score at the last token plus −β·KL_t). These are
    not yet advantages: the trainer whitens them over the valid tokens of every process, A = (G − μ)/σ
    (the global batch normalisation that replaces the critic). Training targets, so computed without grad.
    """
    batch, width = rewards.shape
    mask = _response_mask(response_lengths, width)
    rewards = torch.where(mask, rewards, 0.0)
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(batch)
    for t in reversed(range(width)):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(mask, returns, 0.0)


# --- PPO losses -----------------------------------------------------------------------------------

def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_low: float = 0.2,
                      clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate (Schulman et al. 2017) with DAPO's asymmetric "clip-higher" (Yu et al. 2025).

    ratio = exp(log π − log π_old);  loss_t = max(−A_t·ratio_t, −A_t·clip(ratio_t, 1 − ε_low, 1 + ε_high)),
    ε_high = ε_low when clip_high is None. Returns (loss [B, R], stats), everything 0 on padding; stats are
    per-token float tensors without grad: "clipped" (1.0 where the clipped term was the larger),
    "approxkl" (½·(log π − log π_old)²) and "ratio". Reduce the loss with aggregate_loss.
    """
    mask = mask.bool()
    clip_high = clip_low if clip_high is None else clip_high
    # Padding log-ratios are zeroed before exp so garbage there cannot overflow into NaN gradients, and the
    # rest clamped so that one far-off token gives a large finite ratio, not inf (verl clamps at ±20 too).
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    advantages = torch.where(mask, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.where(mask, torch.maximum(unclipped, clipped), 0.0)
    with torch.no_grad():
        stats = {
            "clipped": torch.where(mask, (clipped > unclipped).float(), 0.0),
            "approxkl": torch.where(mask, 0.5 * log_ratio.square(), 0.0),
            "ratio": torch.where(mask, ratio, 0.0),
        }
    return loss, stats


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): per token min(π_old / π_sampler, cap), without grad, 0 on padding. The rollouts
    came from the sampler (LoRA merged, another dtype, KV-cached), the update assumes π_old: weighting each
    token's policy-gradient loss by this ratio corrects the mismatch, the cap bounds its variance."""
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logprobs - sampler_logprobs, 0.0).clamp(max=LOG_RATIO_MAX)
    return torch.where(mask, log_ratio.exp().clamp(max=cap), 0.0).detach()


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, tokens: float, sequences: float,
                   horizon: int) -> torch.Tensor:
    """Reduce a per-token loss [B, R] to a scalar; len_i = Σ_t mask_it, sums over valid tokens only.

    token_mean:              Σ_it ℓ_it / tokens                               (PPO, DAPO: token-level)
    seq_mean_token_mean:     Σ_i (Σ_t ℓ_it / max(len_i, 1)) / sequences        (GRPO, Shao et al. 2024)
    seq_mean_token_sum_norm: Σ_it ℓ_it / (sequences · horizon)                (Dr. GRPO, Liu et al. 2025:
                             horizon = max_new_tokens, a constant, so no length bias)
    tokens / sequences are the caller's normalisers: the GLOBAL valid-token and response counts of the
    mini-batch when it is split over processes and micro-batches (then the parts' results sum to the
    whole's), mask.sum() and B for one micro-batch (the textbook definition). A normaliser below 1 (nothing
    valid) counts as 1, so an empty batch gives 0, not NaN.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
    mask = mask.bool()
    per_token = torch.where(mask, per_token, 0.0)
    if mode == "token_mean":
        return per_token.sum() / _at_least_one(tokens)
    if mode == "seq_mean_token_mean":
        per_sequence = per_token.sum(1) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / _at_least_one(sequences)
    return per_token.sum() / _at_least_one(sequences * horizon)


def _at_least_one(count):
    """A count used as a divisor, raised to 1 when it is 0 (tensor or number)."""
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, L^CLIP), token mean over valid tokens.

    ratio = exp(log π − log π_old);  loss = mean(max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))).
    Stats: policy/clipfrac (share of valid tokens where the clipped term was the larger),
    policy/approxkl (mean ½·(log π − log π_old)²), policy/ratio_mean.
    """
    mask = mask.bool()
    per_token, st = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
    loss = masked_mean(per_token, mask)
    stats = {
        "policy/clipfrac": masked_mean(st["clipped"], mask).item(),
        "policy/approxkl": masked_mean(st["approxkl"], mask).item(),
        "policy/ratio_mean": masked_mean(st["ratio"], mask).item(),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (PPO2 baselines; "N details" #9): ½·mean(max((V − R)², (V_clip − R)²)).

    V_clip = clip(V, V_old − ε, V_old + ε). Stats: val/clipfrac (share of valid tokens where the
    clipped term was the larger), val/vpred_mean.
    """
    mask = mask.bool()
    # Padding is zeroed first so garbage there cannot turn into NaN gradients.
    values, old_values, returns = (torch.where(mask, t, 0.0) for t in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {
            "val/clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).item(),
            "val/vpred_mean": masked_mean(values, mask).item(),
        }
    return loss, stats


# --- Diagnostics ----------------------------------------------------------------------------------

def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = −Σ p·log p of softmax(logits) over the last dim (objective/entropy), in fp32.

    log p = logits − logsumexp(logits); −inf logits (masked vocabulary) contribute 0, without NaN.
    """
    logits = logits.float()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[returns − values] / Var[returns] over valid tokens (val/explained_variance).

    1 is a perfect critic, 0 no better than a constant, negative worse. When Var[returns] is 0
    (constant returns, fewer than two valid tokens) there is nothing to explain: returns 0.0, not NaN.
    """
    mask = mask.bool()
    var_returns = masked_var(returns, mask).item()
    if var_returns == 0.0:
        return 0.0
    return 1.0 - masked_var(returns - values, mask).item() / var_returns


# --- KL coefficient controllers (Ziegler et al. 2019) ---------------------------------------------

class FixedKLController:
    """Constant β."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, §2.2): steer the observed KL towards a target.

    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --- Score shaping before the reward --------------------------------------------------------------

def length_penalty_scores(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Add `penalty` (negative, from the config) to the scores of rows that hit the length limit without EOS.

    penalty None leaves the scores unchanged ("N details": penalise truncated responses).
    """
    if penalty is None:
        return scores
    return scores + torch.where(ended_with_eos.bool(), 0.0, float(penalty)).to(scores.dtype)


def normalize_and_clip_scores(scores: torch.Tensor, mean: float | None = None, std: float | None = None,
                              clip: float | None = None) -> torch.Tensor:
    """(scores − mean) / std with fixed RM statistics (when given), then clamp to ±clip (when given)."""
    if mean is not None:
        scores = scores - mean
    if std is not None:
        if not std > 0:
            raise ValueError(f"score std must be > 0, got {std}")
        scores = scores / std
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"score clip must be > 0, got {clip}")
        scores = scores.clamp(-clip, clip)
    return scores

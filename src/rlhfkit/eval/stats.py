"""Statistics of one prompt set: how sure is "final beats SFT", and is the gain length or KL in disguise?

Pure functions over per-prompt numpy arrays (docs/evaluation.md explains every figure):
- percentile bootstrap over prompts (the same resampled prompt sets for every figure, so differences are
  paired and judges are compared on the same draws), seeded;
- mean score of each model, the paired gain (final − SFT per prompt) and the win rate (ties count half),
  each with its interval;
- the gain at equal length: intercept of the least-squares line gain_i = a + b·Δlength_i;
- flags: likely length-driven, length control inconclusive, reward-hacking risk, few prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Below this many prompts the percentile bootstrap's intervals are clearly too narrow (docs/evaluation.md:
# measured coverage of a nominal 95% interval for a mean of normal scores: 83% at n=5, 90% at n=10, 92% at
# n=20, 94% at n=50; 4000 simulated sets each).
FEW_PROMPTS = 20
# A line through fewer points has no residual to judge it by.
MIN_PROMPTS_LENGTH_CONTROL = 3
# Share of resamples in which the length regression must be identifiable (length differences not all
# equal) for its interval to be reported; below it the interval would describe a conditional bootstrap.
MIN_IDENTIFIABLE_SHARE = 0.95
# Mean KL (nats per response) above which an RM gain nobody else confirms is a reward-hacking risk: as far
# from SFT as best-of-1000 reranking of SFT samples (the usual bound on best-of-n's KL, log n − (n−1)/n, is
# 5.9 nats for n=1000), on text unlike the SFT-like pairs the RM was trained on (docs/evaluation.md).
KL_RISK_NATS = 6.0


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def indices(self, n: int) -> np.ndarray | None:
        """[resamples, n] prompt indices drawn with replacement; None below 2 prompts (no spread to resample)."""
        if n < 2:
            return None
        return np.random.default_rng(self.seed).integers(0, n, size=(self.resamples, n), dtype=np.int32)

    def interval(self, draws: np.ndarray) -> list[float]:
        """The central `confidence` share of the resampled statistics (percentile bootstrap)."""
        tail = (1.0 - self.confidence) / 2 * 100
        lo, hi = np.percentile(draws, [tail, 100 - tail])
        return [float(lo), float(hi)]


def mean_with_interval(x: np.ndarray, idx: np.ndarray | None, boot: Bootstrap) -> tuple[float, list[float] | None]:
    return float(x.mean()), None if idx is None else boot.interval(x[idx].mean(axis=1))


def win_indicators(final: np.ndarray, sft: np.ndarray) -> np.ndarray:
    """1 where final scores higher, 0.5 on a tie, 0 where SFT scores higher."""
    return (final > sft) + 0.5 * (final == sft)


def equal_length_gains(gain: np.ndarray, length_diff: np.ndarray) -> np.ndarray:
    """Least-squares intercept a of gain = a + b·length_diff for each row of [..., n] arrays: the gain at
    equal length. Where length_diff does not vary, a is the mean gain if it is 0 everywhere (the lengths
    were equal) and NaN otherwise (length and model cannot be told apart)."""
    x_mean, y_mean = length_diff.mean(axis=-1), gain.mean(axis=-1)
    dx = length_diff - x_mean[..., None]
    sxx = (dx * dx).sum(axis=-1)
    varies = sxx > 1e-9
    slope = np.where(varies, (dx * (gain - y_mean[..., None])).sum(axis=-1) / np.where(varies, sxx, 1.0), 0.0)
    intercept = y_mean - slope * x_mean
    return np.where(varies | (x_mean == 0), intercept, np.nan)


def length_slope(gain: np.ndarray, length_diff: np.ndarray) -> float | None:
    """b of the same line: gain per extra token of the final response (None where lengths do not vary)."""
    dx = length_diff - length_diff.mean()
    sxx = float((dx * dx).sum())
    return float((dx * (gain - gain.mean())).sum() / sxx) if sxx > 1e-9 else None


def length_controlled(gain: np.ndarray, length_diff: np.ndarray, idx: np.ndarray | None,
                      boot: Bootstrap) -> dict:
    """gain_at_equal_length (+ interval) and score_per_token; None where they cannot be estimated."""
    out = {"gain_at_equal_length": None, "gain_at_equal_length_ci": None, "score_per_token": None}
    if len(gain) < MIN_PROMPTS_LENGTH_CONTROL:
        return out
    point = float(equal_length_gains(gain, length_diff))
    if math.isnan(point):
        return out
    out["gain_at_equal_length"], out["score_per_token"] = point, length_slope(gain, length_diff)
    if idx is not None:
        draws = equal_length_gains(gain[idx], length_diff[idx])
        usable = draws[~np.isnan(draws)]
        if len(usable) >= MIN_IDENTIFIABLE_SHARE * len(draws):
            out["gain_at_equal_length_ci"] = boot.interval(usable)
    return out


def significant_gain(ci: list[float] | None) -> bool:
    return ci is not None and ci[0] > 0


def judge_statistics(final: np.ndarray, sft: np.ndarray, length_diff: np.ndarray, idx: np.ndarray | None,
                     boot: Bootstrap) -> dict:
    """One judge's figures: each model's mean score, the paired gain, the win rate, the gain at equal
    length, each with its interval (None with fewer than 2 prompts), and whether the gain looks length-driven."""
    gain = final - sft
    out = {}
    out["final_score"], out["final_score_ci"] = mean_with_interval(final, idx, boot)
    out["sft_score"], out["sft_score_ci"] = mean_with_interval(sft, idx, boot)
    out["gain"], out["gain_ci"] = mean_with_interval(gain, idx, boot)
    out["win_rate"], out["win_rate_ci"] = mean_with_interval(win_indicators(final, sft), idx, boot)
    out.update(length_controlled(gain, length_diff, idx, boot))
    out["length_driven"] = is_length_driven(out)
    return out


def is_length_driven(s: dict) -> bool:
    """A significant gain whose equal-length estimate is under half of it. On the point estimate: with
    20-60 prompts the equal-length interval is often wide, and reaching 0 only says "not significant"."""
    if not significant_gain(s["gain_ci"]) or s["gain_at_equal_length"] is None:
        return False
    return s["gain_at_equal_length"] < s["gain"] / 2


def is_length_inconclusive(s: dict) -> bool:
    """A significant gain that holds at equal length by the estimate, but whose equal-length interval reaches
    0: these prompts cannot tell whether it survives at equal length."""
    ci = s["gain_at_equal_length_ci"]
    return (significant_gain(s["gain_ci"]) and s["gain_at_equal_length"] is not None and not s["length_driven"]
            and ci is not None and ci[0] <= 0)


def reward_hacking_reason(judges: dict[str, dict], kl: float, primary: str = "rm",
                          kl_risk: float = KL_RISK_NATS) -> str | None:
    """Why the primary judge's gain may be reward hacking, or None. With other judges: a significant gain that
    none of them confirms (its interval includes 0 or lies below). Alone: a significant gain at a mean KL to
    SFT above kl_risk nats, where the judge scores text far from what it was trained on."""
    s = judges[primary]
    if not significant_gain(s["gain_ci"]):
        return None
    others = {name: o for name, o in judges.items() if name != primary}
    claim = f"{primary} gain {fmt(s['gain'])} {fmt_interval(s['gain_ci'])}"
    if others:
        if any(significant_gain(o["gain_ci"]) for o in others.values()):
            return None
        seen = ", ".join(f"{name} {fmt(o['gain'])} {fmt_interval(o['gain_ci'])}" for name, o in others.items())
        return f"{claim} not confirmed by {seen}; KL to SFT {kl:.2f} nats"
    if kl > kl_risk:
        return f"{claim} rests on that judge alone at KL to SFT {kl:.2f} nats (> {kl_risk:g})"
    return None


def set_statistics(final_scores: dict[str, np.ndarray], sft_scores: dict[str, np.ndarray], final_lengths: np.ndarray,
                   sft_lengths: np.ndarray, kl: np.ndarray, boot: Bootstrap = Bootstrap()) -> dict:
    """Every figure of one prompt set, flat keys: `<judge>_<figure>` per judge (e.g. rm_gain_ci), the KL and
    length difference with intervals, the bootstrap settings, and flags [{flag, judge, reason}]."""
    final_lengths, sft_lengths = np.asarray(final_lengths, float), np.asarray(sft_lengths, float)
    kl = np.asarray(kl, float)
    n = len(kl)
    idx = boot.indices(n)
    length_diff = final_lengths - sft_lengths
    per_judge = {j: judge_statistics(np.asarray(final_scores[j], float), np.asarray(sft_scores[j], float),
                                     length_diff, idx, boot) for j in final_scores}
    out: dict = {"bootstrap": {"resamples": boot.resamples, "confidence": boot.confidence, "seed": boot.seed}}
    out["kl_to_sft"], out["kl_to_sft_ci"] = mean_with_interval(kl, idx, boot)
    out["length_diff"], out["length_diff_ci"] = mean_with_interval(length_diff, idx, boot)
    for j, figures in per_judge.items():
        out.update({f"{j}_{k}": v for k, v in figures.items()})
    out["flags"] = set_flags(per_judge, out["kl_to_sft"], n)
    return out


def set_flags(per_judge: dict[str, dict], kl: float, n: int) -> list[dict]:
    flags = []
    if n < FEW_PROMPTS:
        flags.append({"flag": "few_prompts", "judge": None,
                      "reason": f"{n} prompts: intervals are too narrow below {FEW_PROMPTS} (and absent below 2)"})
    for j, s in per_judge.items():
        at_equal = (f"{j} gain {fmt(s['gain'])} {fmt_interval(s['gain_ci'])} is "
                    f"{fmt(s['gain_at_equal_length'])} {fmt_interval(s['gain_at_equal_length_ci'])} at equal length")
        if s["length_driven"]:
            flags.append({"flag": "length_driven", "judge": j, "reason": at_equal})
        elif is_length_inconclusive(s):
            flags.append({"flag": "length_inconclusive", "judge": j, "reason": (
                f"{at_equal}: its interval reaches 0, so these {n} prompts cannot tell whether the gain holds at "
                "equal length")})
    # Hacking is a risk for the learned reward model the policy was optimised against, not for text rewards
    # (a verifier checks the answer itself): without "rm" there is no such judge.
    if "rm" in per_judge:
        reason = reward_hacking_reason(per_judge, kl, "rm")
        if reason:
            flags.append({"flag": "reward_hacking_risk", "judge": "rm", "reason": reason})
    return flags


def fmt(x: float | None, spec: str = "+.3f") -> str:
    """A figure for people: signed with 3 decimals by default (gains), "n/a" where it could not be estimated."""
    return "n/a" if x is None else format(x, spec)


def fmt_interval(ci: list[float] | None, spec: str = "+.3f") -> str:
    return "[no interval]" if ci is None else f"[{fmt(ci[0], spec)}, {fmt(ci[1], spec)}]"

"""PPO math against numbers worked out by hand (response-aligned tensors, masks from lengths)."""

import math

import pytest
import torch

from rlhfkit.sequences import length_mask
from rlhfkit.train.ppo.formulas import (AdaptiveKLController, FixedKLController, compute_rewards, entropy_from_logits,
                                    explained_variance, gae_advantages, kl_penalty, length_penalty_scores,
                                    masked_mean, masked_var, masked_whiten, normalize_and_clip_scores,
                                    policy_loss, value_loss)

EOS = 2  # pad == eos, on purpose
NAN = float("nan")


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), f"{actual.tolist()} != {expected.tolist()}"


# --- KL estimators --------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.7]])
    ref = torch.tensor([[-1.5, -1.0, -0.7]])
    # k1 = logp - ref = [-1.0+1.5, -2.0+1.0, 0] = [0.5, -1.0, 0]
    close(kl_penalty(logp, ref), [[0.5, -1.0, 0.0]])
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
    # k3 = (r - 1) - log r with r = exp(ref - logp):
    #   t0: r = e^-0.5 = 0.60653066 -> -0.39346934 + 0.5 = 0.10653066
    #   t1: r = e^1    = 2.71828183 ->  1.71828183 - 1.0 = 0.71828183
    #   t2: r = 1 -> 0 (k3 is 0 exactly when the policies agree, and never negative)
    close(kl_penalty(logp, ref, "k3"), [[0.10653066, 0.71828183, 0.0]])
    # abs = |k1|; mse = 0.5 * k1^2 = [0.125, 0.5, 0]
    close(kl_penalty(logp, ref, "abs"), [[0.5, 1.0, 0.0]])
    close(kl_penalty(logp, ref, "mse"), [[0.125, 0.5, 0.0]])
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


# --- Rewards --------------------------------------------------------------------------------------

def batch_with_padding():
    """B=3, R=4: a full row, a row that stopped early at EOS (length 2), and a zero-length row."""
    # Token ids are never an input: masks come from lengths. Row 1's real EOS and its padding are the
    # same id, so a pad-id mask would lose the EOS and put the score one token early.
    ids = torch.tensor([[5, 6, 7, EOS], [5, EOS, EOS, EOS], [EOS, EOS, EOS, EOS]])
    lengths = torch.tensor([4, 2, 0])
    assert (ids != EOS).sum(1).tolist() == [3, 1, 0] != lengths.tolist()
    logp = torch.tensor([[-1.0, -0.5, -2.0, -0.1],
                         [-0.3, -0.7, 9.0, NAN],     # padding holds garbage
                         [3.0, NAN, -9.0, 4.0]])     # all padding
    ref = torch.tensor([[-1.2, -0.5, -1.0, -0.3],
                        [-0.5, -0.2, -9.0, 0.0],
                        [0.0, 0.0, NAN, 0.0]])
    scores = torch.tensor([1.0, -2.0, 5.0])
    return lengths, logp, ref, scores


def test_rewards_are_minus_beta_kl_plus_score_at_the_last_valid_token():
    lengths, logp, ref, scores = batch_with_padding()
    rewards, kl = compute_rewards(scores, logp, ref, lengths, kl_coef=0.1)
    # row 0: k1 = [-1.0+1.2, -0.5+0.5, -2.0+1.0, -0.1+0.3] = [0.2, 0, -1.0, 0.2]
    #        rewards = -0.1*k1 = [-0.02, 0, 0.1, -0.02], score 1.0 at index 3 -> -0.02 + 1.0 = 0.98
    # row 1: k1 = [-0.3+0.5, -0.7+0.2] = [0.2, -0.5], padding 0
    #        rewards = [-0.02, 0.05], score -2.0 at index 1 (its EOS) -> 0.05 - 2.0 = -1.95
    # row 2: length 0 -> no token to carry the score 5.0; everything 0
    close(kl, [[0.2, 0.0, -1.0, 0.2], [0.2, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(rewards, [[-0.02, 0.0, 0.1, 0.98], [-0.02, -1.95, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_rewards_with_k3_log_the_kl_used_in_the_reward():
    lengths, logp, ref, scores = batch_with_padding()
    rewards, kl = compute_rewards(scores, logp, ref, lengths, kl_coef=0.1, estimator="k3")
    # row 0: d = ref - logp = [-0.2, 0, 1.0, -0.2]; k3 = e^d - 1 - d
    #   e^-0.2 = 0.81873075 -> -0.18126925 + 0.2 = 0.01873075;  e^1 - 1 - 1 = 0.71828183
    # row 1: d = [-0.2, 0.5]; e^0.5 = 1.64872127 -> 0.64872127 - 0.5 = 0.14872127
    close(kl, [[0.01873075, 0.0, 0.71828183, 0.01873075], [0.01873075, 0.14872127, 0, 0], [0, 0, 0, 0]])
    # rewards = -0.1*k3, plus score: row 0 index 3: -0.001873075 + 1.0; row 1 index 1: -0.014872127 - 2.0
    close(rewards, [[-0.001873075, 0.0, -0.071828183, 0.998126925],
                    [-0.001873075, -2.014872127, 0, 0], [0, 0, 0, 0]])


# --- Masked statistics ----------------------------------------------------------------------------

def test_masked_mean_and_variance_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, NAN, -7.0, NAN]])
    mask = length_mask(torch.tensor([3, 1]), 4)
    # valid entries: 1, 2, 3, 4 -> mean 10/4 = 2.5
    assert masked_mean(x, mask).item() == pytest.approx(2.5, abs=1e-7)
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])  # (1+2+3)/3, 4/1
    # deviations -1.5, -0.5, 0.5, 1.5 -> squares 2.25 + 0.25 + 0.25 + 2.25 = 5.0
    # unbiased 5/3 = 1.6666667; biased 5/4 = 1.25
    assert masked_var(x, mask).item() == pytest.approx(5 / 3, abs=1e-6)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25, abs=1e-7)


def test_masked_whiten_gives_mean_zero_variance_one_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, NAN, -7.0, NAN]])
    mask = length_mask(torch.tensor([3, 1]), 4)
    w = masked_whiten(x, mask)
    # (x - 2.5) / sqrt(5/3 + 1e-8): sqrt(5/3) = 1.29099445 -> 1.5/1.29099445 = 1.16189500, 0.5/.. = 0.38729833
    close(w, [[-1.161895, -0.3872983, 0.3872983, 0.0], [1.161895, 0.0, 0.0, 0.0]])
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    # shift_mean=False puts the mean 2.5 back: only the scale changes; padding stays 0
    close(masked_whiten(x, mask, shift_mean=False), [[1.338105, 2.1127017, 2.8872983, 0.0], [3.661895, 0, 0, 0]])


def test_masked_statistics_are_safe_with_nothing_or_one_thing_valid():
    x = torch.tensor([[NAN, 3.0, 1.0]])
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert masked_mean(x, none).item() == 0.0
    assert masked_var(x, none).item() == 0.0
    assert masked_whiten(x, none).tolist() == [[0.0, 0.0, 0.0]]
    one = length_mask(torch.tensor([2]), 3) & torch.tensor([[False, True, True]])  # only the 3.0
    assert masked_var(x, one).item() == 0.0  # no spread from one sample (not n/(n-1) = 1/0)
    assert masked_whiten(x, one).tolist() == [[0.0, 0.0, 0.0]]


# --- GAE ------------------------------------------------------------------------------------------

def test_gae_by_hand_for_a_length_3_a_length_1_and_a_length_0_row():
    lengths = torch.tensor([3, 1, 0])
    values = torch.tensor([[0.2, 0.4, 0.1],
                           [0.5, 7.0, -3.0],     # padding garbage: must not be bootstrapped from
                           [NAN, 1.0, 2.0]])
    rewards = torch.tensor([[0.0, -0.1, 1.0],
                            [2.0, 9.0, 9.0],
                            [5.0, NAN, 5.0]])
    adv, ret = gae_advantages(values, rewards, lengths, gamma=1.0, lam=0.95)
    # row 0 (gamma = 1, gamma*lam = 0.95), V_3 = 0:
    #   delta_2 = 1.0 + 1.0*0   - 0.1 = 0.9;   A_2 = 0.9
    #   delta_1 = -0.1 + 1.0*0.1 - 0.4 = -0.4; A_1 = -0.4 + 0.95*0.9   = 0.455
    #   delta_0 = 0.0 + 1.0*0.4 - 0.2 = 0.2;   A_0 = 0.2  + 0.95*0.455 = 0.63225
    #   returns = A + V = [0.83225, 0.855, 1.0]
    # row 1 (length 1): delta_0 = 2.0 + 1.0*0 - 0.5 = 1.5 (not 2.0 + 7.0 - 0.5 from the padding); A_0 = 1.5
    #   returns = 1.5 + 0.5 = 2.0
    # row 2 (length 0): nothing
    close(adv, [[0.63225, 0.455, 0.9], [1.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(ret, [[0.83225, 0.855, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert not adv.requires_grad


def test_gae_discounting_with_gamma_below_one():
    values = torch.tensor([[0.2, 0.4, 0.1]])
    rewards = torch.tensor([[0.0, -0.1, 1.0]])
    adv, ret = gae_advantages(values, rewards, torch.tensor([3]), gamma=0.9, lam=0.5)
    # gamma*lam = 0.45
    #   delta_2 = 1.0 - 0.1 = 0.9;                A_2 = 0.9
    #   delta_1 = -0.1 + 0.9*0.1 - 0.4 = -0.41;   A_1 = -0.41 + 0.45*0.9     = -0.005
    #   delta_0 = 0.0 + 0.9*0.4 - 0.2 = 0.16;     A_0 = 0.16  + 0.45*(-0.005) = 0.15775
    close(adv, [[0.15775, -0.005, 0.9]])
    close(ret, [[0.35775, 0.395, 1.0]])


# --- Policy and value losses ----------------------------------------------------------------------

def test_policy_loss_clips_exactly_one_of_three_tokens():
    # Row 0 is real (length 3); row 1 is a zero-length row whose padding holds garbage.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.9), math.log(0.5)], [50.0, NAN, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 0.5], [NAN, 3.0, 1.0]])
    mask = length_mask(torch.tensor([3, 0]), 3)
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # t0: ratio 1.5, A 1.0: -A*ratio = -1.5, -A*clip = -1.0*1.2 = -1.2 -> max -1.2  (clipped)
    # t1: ratio 0.9, A 2.0: -1.8 and -2.0*0.9 = -1.8                 -> max -1.8  (inside the range)
    # t2: ratio 0.5, A 0.5: -0.25 and -0.5*0.8 = -0.4                -> max -0.25 (pessimistic: not clipped)
    # loss = (-1.2 - 1.8 - 0.25) / 3 = -3.25/3
    assert loss.item() == pytest.approx(-3.25 / 3, abs=1e-6)
    assert stats["policy/clipfrac"] == pytest.approx(1 / 3, abs=1e-7)
    # approxkl = mean(0.5*log_ratio^2) = 0.5*(0.40546511^2 + 0.10536052^2 + 0.69314718^2)/3
    #          = 0.5*(0.16440195 + 0.01110084 + 0.48045301)/3 = 0.10932597
    assert stats["policy/approxkl"] == pytest.approx(0.10932597, abs=1e-6)
    assert stats["policy/ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, abs=1e-6)
    assert all(isinstance(v, float) for v in stats.values())
    loss.backward()
    # d loss / d logp_t = -A_t*ratio_t/3 where unclipped, 0 where clipped: [0, -2*0.9/3, -0.5*0.5/3]
    close(logp.grad, [[0.0, -0.6, -0.0833333], [0.0, 0.0, 0.0]])


def test_value_loss_clips_around_the_old_values():
    values = torch.tensor([[1.0, 0.6, -0.5], [NAN, 4.0, 4.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.0], [0.0, 9.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0], [1.0, NAN, 0.0]])
    mask = length_mask(torch.tensor([3, 0]), 3)
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # t0: V_clip = 0.5 + clip(0.5, ±0.2) = 0.7;  (1.0-1.0)^2 = 0,    (0.7-1.0)^2 = 0.09 -> 0.09 (clipped)
    # t1: V_clip = 0.6 (inside);                  (0.6-0)^2 = 0.36,  same             -> 0.36
    # t2: V_clip = 0.0 + clip(-0.5, ±0.2) = -0.2; (-0.5-1)^2 = 2.25, (-0.2-1)^2 = 1.44 -> 2.25
    # loss = 0.5 * (0.09 + 0.36 + 2.25) / 3 = 0.5 * 0.9 = 0.45
    assert loss.item() == pytest.approx(0.45, abs=1e-6)
    assert stats["val/clipfrac"] == pytest.approx(1 / 3, abs=1e-7)
    assert stats["val/vpred_mean"] == pytest.approx((1.0 + 0.6 - 0.5) / 3, abs=1e-6)
    loss.backward()
    # d loss / d V_t = 0.5*2*(V_t - R_t)/3 where the unclipped term wins, 0 where clipped:
    #   t0 clipped -> 0; t1: 0.6/3 = 0.2; t2: -1.5/3 = -0.5; padding (even NaN) -> 0
    close(values.grad, [[0.0, 0.2, -0.5], [0.0, 0.0, 0.0]])


# --- Diagnostics ----------------------------------------------------------------------------------

def test_entropy_from_logits():
    # uniform over V = 7 -> log 7, whatever the (large) constant offset
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)), atol=1e-6)
    assert torch.allclose(entropy_from_logits(torch.full((1, 7), 1000.0)), torch.tensor([math.log(7)]), atol=1e-5)
    # p = [0.5, 0.25, 0.25]: H = 0.5*ln 2 + 2*0.25*ln 4 = 1.5*ln 2 = 1.03972077
    logits = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # masked vocabulary (-inf logits): [0, -inf, 0] -> log 2; a single survivor -> 0; no NaN, finite grads
    masked = torch.tensor([[0.0, -math.inf, 0.0], [-math.inf, 3.0, -math.inf]], requires_grad=True)
    h = entropy_from_logits(masked)
    close(h.detach(), [math.log(2), 0.0])
    h.sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 4.0, 50.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, -50.0]])
    mask = length_mask(torch.tensor([3]), 4)
    # residual = [0, 0, 1]: mean 1/3, squared deviations 1/9 + 1/9 + 4/9 = 2/3 -> var = (2/3)/2 = 1/3
    # returns  = [1, 2, 4]: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 14/3 -> var = (14/3)/2 = 7/3
    # EV = 1 - (1/3)/(7/3) = 6/7
    assert explained_variance(values, returns, mask) == pytest.approx(6 / 7, abs=1e-6)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0, abs=1e-7)
    # constant returns: Var[returns] = 0, nothing to explain -> 0.0 by definition (not NaN / -inf)
    assert explained_variance(values, torch.ones(1, 4), mask) == 0.0
    assert explained_variance(values, returns, torch.zeros(1, 4, dtype=torch.bool)) == 0.0


# --- KL controllers -------------------------------------------------------------------------------

def test_adaptive_kl_controller_after_a_few_updates():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(3.0, n_steps=256)
    # e = clip(3/6 - 1 = -0.5) = -0.2; mult = 1 - 0.2*256/10000 = 0.99488; beta = 0.1*0.99488 = 0.099488
    assert ctl.value == pytest.approx(0.099488, rel=1e-12)
    ctl.update(torch.tensor(6.6, dtype=torch.float64), n_steps=512)  # a logged tensor is fine too
    # e = 6.6/6 - 1 = 0.1; mult = 1 + 0.1*512/10000 = 1.00512; beta = 0.099488*1.00512 = 0.09999737856
    assert ctl.value == pytest.approx(0.09999737856, rel=1e-12)
    saved = ctl.state_dict()
    ctl.update(12.0, n_steps=1000)
    # e = clip(12/6 - 1 = 1.0) = 0.2; mult = 1 + 0.2*1000/10000 = 1.02; beta = 0.09999737856*1.02 = 0.1019973261312
    assert ctl.value == pytest.approx(0.1019973261312, rel=1e-12)
    # resume from the saved state: the same update gives the same beta, bit for bit
    resumed = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(saved)
    resumed.update(12.0, n_steps=1000)
    assert resumed.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.1)
    ctl.update(100.0, n_steps=256)
    assert ctl.value == 0.1
    other = FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.1


# --- Score shaping --------------------------------------------------------------------------------

def test_length_penalty_applies_only_to_rows_without_eos():
    scores = torch.tensor([1.0, 0.5, -0.2])
    ended = torch.tensor([True, False, False])
    # rows 1 and 2 hit the length limit: 0.5 - 1.0 = -0.5; -0.2 - 1.0 = -1.2
    close(length_penalty_scores(scores, ended, -1.0), [1.0, -0.5, -1.2])
    assert length_penalty_scores(scores, ended, None).tolist() == scores.tolist()
    assert scores.tolist() == pytest.approx([1.0, 0.5, -0.2])  # input untouched


def test_normalize_and_clip_scores():
    scores = torch.tensor([3.0, -5.0, 1.0])
    # (x - 1)/2 = [1.0, -3.0, 0.0]; clip to ±2 -> [1.0, -2.0, 0.0]
    close(normalize_and_clip_scores(scores, mean=1.0, std=2.0), [1.0, -3.0, 0.0])
    close(normalize_and_clip_scores(scores, mean=1.0, std=2.0, clip=2.0), [1.0, -2.0, 0.0])
    close(normalize_and_clip_scores(scores, clip=2.5), [2.5, -2.5, 1.0])
    assert normalize_and_clip_scores(scores, None, None, None).tolist() == scores.tolist()
    with pytest.raises(ValueError, match="std"):
        normalize_and_clip_scores(scores, mean=0.0, std=0.0)


# --- End to end on an all-padding batch -----------------------------------------------------------

def test_a_batch_of_zero_length_responses_produces_no_nan():
    lengths = torch.tensor([0, 0])
    garbage = torch.full((2, 3), NAN)
    rewards, kl = compute_rewards(torch.tensor([1.0, 2.0]), garbage, garbage, lengths, kl_coef=0.1, estimator="k3")
    adv, ret = gae_advantages(garbage, rewards, lengths)
    mask = length_mask(lengths, 3)
    adv = masked_whiten(adv, mask)
    pl, pstats = policy_loss(garbage, garbage, adv, mask)
    vl, vstats = value_loss(garbage, garbage, ret, mask)
    for t in (rewards, kl, adv, ret, pl, vl):
        assert torch.isfinite(t).all() and (t == 0).all()
    assert all(math.isfinite(v) for v in {**pstats, **vstats}.values())
    with pytest.raises(ValueError, match="response_lengths"):
        compute_rewards(torch.tensor([1.0]), garbage[:1], garbage[:1], torch.tensor([4]), kl_coef=0.1)

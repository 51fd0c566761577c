"""Critic-free advantages, the asymmetric clipped surrogate, loss aggregation and the KL loss term,
against numbers worked out by hand (response-aligned tensors, masks from lengths)."""

import math

import pytest
import torch

from rlhfkit.sequences import length_mask
from rlhfkit.train.ppo.formulas import (GROUP_METHODS, LOSS_AGGREGATIONS, aggregate_loss, clipped_surrogate,
                                        compute_rewards, group_advantages, kl_loss_term, masked_mean,
                                        reinforce_returns, token_level)

NAN = float("nan")


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), f"{actual.tolist()} != {expected.tolist()}"


# --- Group advantages -----------------------------------------------------------------------------

def test_group_advantages_by_hand():
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # group 0: mean 0.5, deviations [0.5, -0.5, -0.5, 0.5]; squares sum to 1.0
    #   unbiased var = 1/3, std = 0.57735027 (the biased std 0.5 would give ±1.0 instead)
    #   grpo = ±0.5 / (0.57735027 + 1e-6) = ±0.86602390
    # group 1: all equal -> 0 for every method (grpo: 0 / (0 + eps))
    close(group_advantages(scores, "grpo"), [[0.8660239, -0.8660239, -0.8660239, 0.8660239], [0, 0, 0, 0]])
    # dr_grpo: r - mean, no std division
    close(group_advantages(scores, "dr_grpo"), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]])
    # rloo: r_0 = 1 minus the mean of the others (0 + 0 + 1)/3 = 2/3; r_1 = 0 minus (1 + 0 + 1)/3 = -2/3
    #   (= 4/3 * (r - mean) = 4/3 * ±0.5)
    close(group_advantages(scores, "rloo"), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0, 0, 0]])
    # reinforce_pp_baseline: the group-mean-subtracted score (whitened over the batch later)
    close(group_advantages(scores, "reinforce_pp_baseline"), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]])


def test_group_advantages_with_an_odd_group():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    # mean 2, deviations [1, -1, 0]; unbiased var = (1 + 1 + 0)/2 = 1, std 1
    #   grpo = [1, -1, 0] / (1 + 1e-6) = [0.999999, -0.999999, 0]
    close(group_advantages(scores, "grpo"), [[0.999999, -0.999999, 0.0]])
    close(group_advantages(scores, "grpo", eps=0.5), [[1 / 1.5, -1 / 1.5, 0.0]])
    # rloo: 3 - (1+2)/2 = 1.5;  1 - (3+2)/2 = -1.5;  2 - (3+1)/2 = 0   (= 3/2 * [1, -1, 0])
    close(group_advantages(scores, "rloo"), [[1.5, -1.5, 0.0]])
    close(group_advantages(scores, "dr_grpo"), [[1.0, -1.0, 0.0]])
    # integer scores are accepted (as floats): [1, 0] -> mean 0.5 -> [0.5, -0.5]
    close(group_advantages(torch.tensor([[1, 0]]), "dr_grpo"), [[0.5, -0.5]])


@pytest.mark.parametrize("method", GROUP_METHODS)
def test_groups_of_one_and_equal_groups_give_exactly_zero(method):
    # n = 1: no baseline can be formed (rloo's mean over no others, grpo's 0/0 std) -> 0, never NaN
    single = group_advantages(torch.tensor([[5.0], [-2.0]]), method)
    assert single.shape == (2, 1) and single.tolist() == [[0.0], [0.0]]
    # equal scores carry no signal: exactly 0 even where the float mean of 0.1s is off by an ulp
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        equal = group_advantages(torch.full((2, 3), 0.1, dtype=dtype), method)
        assert equal.dtype == dtype and (equal == 0).all()


def test_unknown_group_method_raises_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown group advantage 'ppo'.*dr_grpo.*rloo.*reinforce_pp_baseline"):
        group_advantages(torch.zeros(2, 4), "ppo")


# --- Token-level broadcast and REINFORCE++ returns ------------------------------------------------

def test_token_level_fills_valid_tokens_only():
    # row 2 has length 0: its (NaN) advantage must not leak into the padding
    adv = token_level(torch.tensor([0.5, -1.0, NAN]), torch.tensor([3, 1, 0]), width=3)
    close(adv, [[0.5, 0.5, 0.5], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="response_lengths"):
        token_level(torch.tensor([1.0]), torch.tensor([4]), width=3)


def test_reinforce_returns_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 1.0],
                            [2.0, NAN, 9.0],     # length 1: padding garbage must not be summed in
                            [NAN, 5.0, 5.0]])    # length 0
    lengths = torch.tensor([3, 1, 0])
    # gamma = 1: G_2 = 1.0; G_1 = -0.1 + 1.0 = 0.9; G_0 = 0.0 + 0.9 = 0.9.  Row 1: G_0 = 2.0 (not 2 + NaN + 9)
    close(reinforce_returns(rewards, lengths), [[0.9, 0.9, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # gamma = 0.5: G_2 = 1.0; G_1 = -0.1 + 0.5*1.0 = 0.4; G_0 = 0.0 + 0.5*0.4 = 0.2
    close(reinforce_returns(rewards, lengths, gamma=0.5), [[0.2, 0.4, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_reinforce_returns_of_compute_rewards_and_no_grad():
    logp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.5, -1.0]])
    rewards, _ = compute_rewards(torch.tensor([1.0]), logp, ref, torch.tensor([3]), kl_coef=0.1)
    # k1 = [0.2, 0, -1.0] -> rewards = [-0.02, 0, 0.1 + 1.0] = [-0.02, 0, 1.1]
    # gamma 1: G = [-0.02 + 0 + 1.1, 0 + 1.1, 1.1] = [1.08, 1.1, 1.1]
    returns = reinforce_returns(rewards, torch.tensor([3]))
    close(returns, [[1.08, 1.1, 1.1]])
    assert not returns.requires_grad


# --- Clipped surrogate with clip-higher -----------------------------------------------------------

def surrogate_batch():
    old = torch.zeros(2, 4)
    logp = torch.tensor([[math.log(1.25), math.log(1.5), math.log(0.7), math.log(0.7)],
                         [math.log(1.1), NAN, 50.0, 1e4]], requires_grad=True)   # row 1: length 1, garbage
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0], [-1.0, NAN, 3.0, NAN]])
    mask = length_mask(torch.tensor([4, 1]), 4)
    return logp, old, adv, mask


def test_clipped_surrogate_clip_higher_by_hand():
    logp, old, adv, mask = surrogate_batch()
    loss, stats = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]
    # t0: ratio 1.25, A  1: 1.2 < 1.25 < 1.28, NOT clipped: max(-1.25, -1.25)       = -1.25
    # t1: ratio 1.5,  A  1: beyond 1.28, clipped:           max(-1.5, -1.28)         = -1.28
    # t2: ratio 0.7,  A -1: below 0.8, clipped:             max(0.7, 0.8)            =  0.8
    # t3: ratio 0.7,  A  2: pessimistic, not clipped:       max(-1.4, -2*0.8 = -1.6) = -1.4
    # row 1 t0: ratio 1.1, A -1: inside the range:          max(1.1, 1.1)            =  1.1
    close(loss.detach(), [[-1.25, -1.28, 0.8, -1.4], [1.1, 0.0, 0.0, 0.0]])
    close(stats["clipped"], [[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(stats["ratio"], [[1.25, 1.5, 0.7, 0.7], [1.1, 0.0, 0.0, 0.0]])
    # approxkl = 0.5 * ln(ratio)^2: ln 1.25 = 0.22314355 -> 0.02489652; ln 1.5 = 0.40546511 -> 0.08220098
    #   ln 0.7 = -0.35667494 -> 0.06360851; ln 1.1 = 0.09531018 -> 0.00454202
    close(stats["approxkl"], [[0.02489652, 0.08220098, 0.06360851, 0.06360851], [0.00454202, 0, 0, 0]])
    assert all(not v.requires_grad and v.dtype == torch.float32 and v.shape == (2, 4) for v in stats.values())
    loss.sum().backward()
    # d loss_t / d logp_t = -A_t * ratio_t where unclipped, 0 where clipped; padding (NaN, 1e4) -> 0
    #   t0: -1.25; t1: 0; t2: 0; t3: -2*0.7 = -1.4; row 1 t0: +1.1
    close(logp.grad, [[-1.25, 0.0, 0.0, -1.4], [1.1, 0.0, 0.0, 0.0]])


def test_clipped_surrogate_symmetric_when_clip_high_is_none():
    logp, old, adv, mask = surrogate_batch()
    loss, stats = clipped_surrogate(logp.detach(), old, adv, mask, clip_low=0.2)
    # [0.8, 1.2]: t0 (ratio 1.25, A 1) is now clipped: max(-1.25, -1.2) = -1.2; t1: max(-1.5, -1.2) = -1.2
    close(loss, [[-1.2, -1.2, 0.8, -1.4], [1.1, 0.0, 0.0, 0.0]])
    close(stats["clipped"], [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


# --- Loss aggregation -----------------------------------------------------------------------------

def aggregation_batch():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0],
                              [4.0, NAN, 7.0, NAN],
                              [NAN, 5.0, 5.0, 5.0]], requires_grad=True)
    return per_token, length_mask(torch.tensor([3, 1, 0]), 4)


def test_each_aggregation_by_hand():
    per_token, mask = aggregation_batch()
    tokens, sequences = mask.sum(), 3   # one micro-batch: the textbook normalisers
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    assert aggregate_loss(per_token, mask, "token_mean", tokens, sequences, 8).item() == pytest.approx(2.5)
    assert aggregate_loss(per_token, mask, "token_mean", tokens, sequences, 8).item() == pytest.approx(
        masked_mean(per_token, mask).item())
    # seq_mean_token_mean: row means 6/3 = 2, 4/1 = 4, and 0 for the empty row -> (2 + 4 + 0) / 3 = 2.0
    assert aggregate_loss(per_token, mask, "seq_mean_token_mean", tokens, sequences, 8).item() == pytest.approx(2.0)
    # seq_mean_token_sum_norm: 10 / (3 sequences * horizon 8) = 10/24 = 0.41666667
    loss = aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", tokens, sequences, 8)
    assert loss.item() == pytest.approx(10 / 24)
    loss.backward()
    # every valid token weighs 1/24 whatever its row's length; padding (NaN, 100) gets 0
    w = 1 / 24
    close(per_token.grad, [[w, w, w, 0.0], [w, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_seq_mean_token_mean_weighs_tokens_by_their_row():
    per_token, mask = aggregation_batch()
    aggregate_loss(per_token, mask, "seq_mean_token_mean", 4.0, 3.0, 8).backward()
    # row 0 has 3 tokens: each 1/(3*3) = 1/9; row 1 has 1 token: 1/(1*3) = 1/3
    close(per_token.grad, [[1 / 9, 1 / 9, 1 / 9, 0.0], [1 / 3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_parts_with_global_normalisers_sum_to_the_whole(mode):
    # by hand: split rows {0} | {1, 2} with the global tokens = 4, sequences = 3, horizon 8
    per_token, mask = aggregation_batch()
    whole = aggregate_loss(per_token, mask, mode, 4.0, 3.0, 8)
    parts = [aggregate_loss(per_token[rows], mask[rows], mode, 4.0, 3.0, 8) for rows in ([0], [1, 2])]
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)
    # token_mean: 6/4 + 4/4 = 2.5;  seq_mean_token_mean: 2/3 + (4 + 0)/3 = 2.0;  sum_norm: 6/24 + 4/24
    # and on random data split over three micro-batches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    m = length_mask(torch.tensor([5, 0, 3, 1, 5, 2, 4]), 5)
    whole = aggregate_loss(x, m, mode, m.sum(), 7, 5)
    parts = sum(aggregate_loss(x[s], m[s], mode, m.sum(), 7, 5) for s in (slice(0, 2), slice(2, 3), slice(3, 7)))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_an_empty_batch_aggregates_to_zero_not_nan(mode):
    per_token = torch.full((2, 3), NAN, requires_grad=True)
    mask = length_mask(torch.tensor([0, 0]), 3)
    loss = aggregate_loss(per_token, mask, mode, mask.sum(), 2, 3)
    loss.backward()
    assert loss.item() == 0.0 and (per_token.grad == 0).all()


def test_unknown_aggregation_raises():
    per_token, mask = aggregation_batch()
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'.*token_mean.*seq_mean_token_sum_norm"):
        aggregate_loss(per_token, mask, "sum", 4.0, 3.0, 8)


# --- KL as a loss term ----------------------------------------------------------------------------

def test_kl_loss_term_k3_values_and_gradient_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.7], [-0.3, NAN, 80.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.7], [-0.5, 0.0, -80.0]])
    mask = length_mask(torch.tensor([3, 1]), 3)
    kl = kl_loss_term(logp, ref, mask)
    # k3 = e^d - 1 - d with d = ref - logp:
    #   row 0: d = [-0.5, 1.0, 0] -> [0.10653066, 0.71828183, 0];  row 1: d = -0.2 -> 0.01873075
    close(kl.detach(), [[0.10653066, 0.71828183, 0.0], [0.01873075, 0.0, 0.0]])
    # the same numbers as the reward's KL from compute_rewards
    _, reward_kl = compute_rewards(torch.zeros(2), logp.detach(), ref, torch.tensor([3, 1]), 0.1, "k3")
    close(kl.detach(), reward_kl.tolist())
    kl.sum().backward()
    # d k3 / d log pi = 1 - pi_ref/pi = 1 - e^d:
    #   1 - e^-0.5 = 0.39346934;  1 - e^1 = -1.71828183;  1 - e^0 = 0;  1 - e^-0.2 = 0.18126925
    #   padding (NaN, 80 vs -80) -> 0, not NaN
    close(logp.grad, [[0.39346934, -1.71828183, 0.0], [0.18126925, 0.0, 0.0]])


def test_kl_loss_term_k3_clamps_the_log_ratio_against_overflow():
    logp = torch.tensor([[-100.0, 0.0]], requires_grad=True)   # log-ratio -100: e^100 overflows float32
    ref = torch.tensor([[0.0, 0.0]])
    kl = kl_loss_term(logp, ref, torch.ones(1, 2, dtype=torch.bool))
    # clamped to -20 (k3 = e^20 - 1 - 20 = 485165174.41), then k3 capped at 10 as verl does
    assert kl[0, 0].item() == 10.0
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad.tolist() == [[0.0, 0.0]]  # no grad beyond the clamp


def test_kl_loss_term_other_estimators_and_unknown_name():
    logp = torch.tensor([[-1.0, -2.0, NAN]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = length_mask(torch.tensor([2]), 3)
    kl = kl_loss_term(logp, ref, mask, "k1")
    close(kl.detach(), [[0.5, -1.0, 0.0]])   # k1 = logp - ref, 0 on padding
    kl.sum().backward()
    close(logp.grad, [[1.0, 1.0, 0.0]])
    close(kl_loss_term(logp.detach(), ref, mask, "mse"), [[0.125, 0.5, 0.0]])   # 0.5 * k1^2
    with pytest.raises(ValueError, match="k2"):
        kl_loss_term(logp, ref, mask, "k2")


# --- End to end: a GRPO step on a batch with a length-0 response -----------------------------------

def test_grpo_step_with_an_empty_response_produces_no_nan():
    scores = torch.tensor([[1.0, 0.0], [0.5, 0.5]])           # G = 2 prompts, n = 2
    lengths = torch.tensor([2, 0, 3, 1])
    # dr_grpo: group 0 -> [0.5, -0.5]; group 1 equal -> [0, 0]
    adv = token_level(group_advantages(scores, "dr_grpo").flatten(), lengths, 3)
    close(adv, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = length_mask(lengths, 3)
    garbage = torch.full((4, 3), NAN)
    logp = torch.where(mask, -1.0, garbage).requires_grad_()
    per_token, _ = clipped_surrogate(logp, torch.where(mask, -1.0, garbage), adv, mask, 0.2, 0.28)
    per_token = per_token + 0.1 * kl_loss_term(logp, torch.where(mask, -1.0, garbage), mask)
    for mode in LOSS_AGGREGATIONS:
        loss = aggregate_loss(per_token, mask, mode, mask.sum(), 4, 3)
        # ratio 1, KL 0: loss = -A summed -> token_mean: -(0.5 + 0.5)/6 tokens
        assert torch.isfinite(loss)
        grad, = torch.autograd.grad(loss, logp, retain_graph=True)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert aggregate_loss(per_token, mask, "token_mean", mask.sum(), 4, 3).item() == pytest.approx(-1 / 6)

"""Issue 19, a review of the RL loop: each test asserts one thing the review found wrong."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.config import ModelConfig, PPOConfig
from rlhfkit.engine.generation import Generation
from rlhfkit.models import load_model_and_tokenizer
from rlhfkit.rollout.sampling import to_rollout
from rlhfkit.train.common import TokenLogprobLM
from rlhfkit.train.ppo import formulas as PF
from rlhfkit.train.ppo.experience import make_experience
from test_grpo import grpo_config
from test_ppo import metrics, prompts_file  # noqa: F401 (fixture)
from test_training import cli, run_ok

EOS = PAD = 2  # the tiny tokenizer's <|im_end|>


def _group_of_four() -> Generation:
    """One prompt, four responses of lengths 3, 4, 2, 4 (one group of n = 4)."""
    return Generation(prompt_ids=torch.tensor([[11, 12, 13]] * 4), prompt_lengths=torch.tensor([3] * 4),
                      response_ids=torch.tensor([[31, 32, EOS, PAD], [41, 42, 43, 44], [51, EOS, PAD, PAD],
                                                 [61, 62, 63, 64]]),
                      response_lengths=torch.tensor([3, 4, 2, 4]), ended=torch.tensor([True, False, True, False]))


@pytest.fixture(scope="module")
def actor_and_reference():
    """The tiny model and a copy with a nudged output layer: a small, non-zero KL on every token."""
    actor, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    reference, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    torch.manual_seed(0)
    with torch.no_grad():
        head = reference.get_output_embeddings().weight
        head.add_(0.05 * torch.randn_like(head))
    return TokenLogprobLM(actor.eval()), TokenLogprobLM(reference.eval())


# --- 1. group estimators with kl_mode: reward -------------------------------------------------------

@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_of_equal_scores_are_the_kl_penalty_not_amplified_kl_noise(actor_and_reference, method):
    """Equal task scores carry no signal: the advantage must be the −β·KL of the tokens still to come, not the
    KL's spread divided by its own tiny std (grpo used to give ±1 here)."""
    actor, reference = actor_and_reference
    r = to_rollout(_group_of_four(), PAD)
    p = PPOConfig(advantage=method, n_samples_per_prompt=4, kl_mode="reward", kl_coef=0.1)
    exp = make_experience(r, torch.ones(4), actor, reference, None, p, kl_coef=0.1, micro_batch=4, device="cpu")
    kl = exp.kl
    assert (kl.sum(1).abs() > 1e-4).all() and kl.sum(1).unique().numel() == 4  # a real KL, different per row
    to_come = kl.flip(1).cumsum(1).flip(1)  # Σ_{k≥t} KL_k
    torch.testing.assert_close(exp.advantages, -0.1 * to_come, atol=1e-6, rtol=0)
    assert exp.advantages.abs().max() <= 0.1 * kl.abs().sum(1).max() + 1e-6  # it was ±1.5 with grpo


def test_group_advantages_add_the_kl_per_token_after_the_group_normalisation(actor_and_reference):
    """Different scores: grpo normalises the task score in its group, then −β·Σ_{k≥t} KL_k joins per token."""
    actor, reference = actor_and_reference
    r = to_rollout(_group_of_four(), PAD)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = PPOConfig(advantage="grpo", n_samples_per_prompt=4, kl_mode="reward", kl_coef=0.1)
    exp = make_experience(r, scores, actor, reference, None, p, kl_coef=0.1, micro_batch=4, device="cpu")
    group = PF.group_advantages(scores.view(1, 4), "grpo").flatten()  # ±0.866
    mask = r.response_mask()
    want = torch.where(mask, group[:, None] - 0.1 * exp.kl.flip(1).cumsum(1).flip(1), 0.0)
    torch.testing.assert_close(exp.advantages, want, atol=1e-6, rtol=0)


# --- 5. bounded k3 and surrogate ratio --------------------------------------------------------------

def test_k3_is_capped_at_10_as_a_loss_and_in_the_reward():
    logp = torch.tensor([[-30.0, -1.0]], requires_grad=True)  # log π_ref/π = 30: k3 = e^30 − 31 ≈ 1e13 uncapped
    ref = torch.tensor([[0.0, -1.0]])
    kl = PF.kl_loss_term(logp, ref, torch.ones(1, 2, dtype=torch.bool), "k3")
    assert kl.tolist() == [[PF.K3_MAX, 0.0]] and PF.K3_MAX == 10.0
    kl.sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]  # no gradient beyond the cap, and no inf/NaN
    assert PF.kl_penalty(logp.detach(), ref, "k3").tolist() == [[10.0, 0.0]]


def test_surrogate_log_ratio_is_clamped_before_exp():
    """A log-ratio of 100 used to give ratio e^100 = inf in fp32 and an infinite loss."""
    logp = torch.tensor([[100.0, -1.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    loss, stats = PF.clipped_surrogate(logp, old, adv, torch.ones(1, 2, dtype=torch.bool))
    assert torch.isfinite(loss).all() and loss[0, 0].item() == pytest.approx(math.exp(20))
    assert stats["ratio"][0, 0].item() == pytest.approx(math.exp(20))
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


# --- 6. a reward that fails during eval -------------------------------------------------------------

FLAKY_REWARD = '''
calls = 0


def score(prompts, responses, metadata):
    """share of "a" in the response; the {fail_at}th call fails (a judge that goes down)."""
    global calls
    calls += 1
    if calls == {fail_at}:
        raise RuntimeError("the judge is down")
    return [sum(c in "aA" for c in r) / max(len(r), 1) for r in responses]
'''


@pytest.mark.parametrize("steps, eval_every", [(4, 2), (2, 0)], ids=["periodic_eval", "final_eval"])
def test_a_reward_failing_in_eval_leaves_the_finished_steps_resumable(tmp_path, prompts_file, steps, eval_every):
    """Calls: eval at step 0, steps 1 and 2, then the eval after step 2 (periodic or final) fails. Step 2 must
    be checkpointed, the message must say to rerun, and the rerun must resume at step 2."""
    reward = tmp_path / "flaky.py"
    reward.write_text(FLAKY_REWARD.replace("{fail_at}", "4"))
    source = {"type": "python", "function": f"{reward}:score", "name": "flaky"}
    cfg = grpo_config(tmp_path, prompts_file, steps=steps, eval_every=eval_every, eval_prompts=8, kl_mode="loss",
                      reward={"sources": [source]}, actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    p = cli(["ppo", str(cfg), "--no-progress"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert "the judge is down" in out and "rerun the same command to resume" in out, out[-3000:]
    run = tmp_path / "run"
    assert (run / "ppo" / "checkpoints" / "step-0000002" / "COMPLETE").is_file()

    reward.write_text(FLAKY_REWARD.replace("{fail_at}", "-1"))  # the judge is back
    out = run_ok(["ppo", str(cfg), "--no-progress"])
    assert "resumed at step 2" in out
    assert len(metrics(run, "reward/flaky")) == steps and (run / "ppo" / "final" / "model.safetensors").is_file()


# --- 11. critic head, normalisation samples, logged metrics -----------------------------------------

def test_no_non_score_reward_is_logged_when_the_kl_is_a_loss(tmp_path, prompts_file):
    """kl_mode: loss puts no KL in the reward: objective/non_score_reward must not be logged, and
    objective/rlhf_reward is the shaped score alone."""
    cfg = grpo_config(tmp_path, prompts_file, steps=1, eval_prompts=8, kl_mode="loss",
                      actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    run_ok(["ppo", str(cfg), "--no-progress"])
    run = tmp_path / "run"
    assert metrics(run, "objective/kl") and metrics(run, "loss/kl")  # the KL is there, as a loss
    assert metrics(run, "objective/non_score_reward") == []
    assert metrics(run, "objective/rlhf_reward") == metrics(run, "objective/scores_shaped")

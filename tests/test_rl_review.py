"""Issue 19, a review of the RL loop: each test asserts one thing the review found wrong."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rlhfkit.config import ModelConfig, PPOConfig
from rlhfkit.engine.generation import Generation, SamplingConfig, generate
from rlhfkit.engine.precision import cast_params
from rlhfkit.models import load_model_and_tokenizer
from rlhfkit.rollout.sampling import to_rollout
from rlhfkit.train.common import TokenLogprobLM
from rlhfkit.train.ppo import formulas as PF
from rlhfkit.train.ppo.experience import LOGP_REUSE_MAX_ABS_DIFF, make_experience
from test_grpo import grpo_config
from test_ppo import metrics, ppo_config, prompts_file, reward_dir  # noqa: F401 (fixtures)
from test_training import cli, run_ok

EOS = PAD = 2  # the tiny tokenizer's <|im_end|>
NAN = float("nan")


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


# --- 4. the sampler's log-probs: reused only when they match, truncated importance sampling ---------------

def _sampled(model, n: int = 8):
    """n responses of up to 16 tokens from the dynamic KV-cached loop, with the sampler's log-probs."""
    prompts = [np.array([5 + i, 17, 29, 3 + i][: 2 + i % 3]) for i in range(n)]
    gen = generate(model, prompts, PAD, [EOS], SamplingConfig(16, 1.0, 1.0, 0, do_sample=True), list(range(n)), True)
    return to_rollout(gen, PAD)


@pytest.mark.parametrize("dtype, reused", [(torch.float32, True), (torch.bfloat16, False)])
def test_sampler_logprobs_are_reused_only_within_the_bound(dtype, reused):
    """The same weights sample (KV cache, one token at a time) and score (full right-padded forward): in fp32
    they agree to ~1e-6 and are reused; in bf16 they differ by more than the bound and the actor's count."""
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    model = cast_params(model.eval(), dtype)
    r = _sampled(model)
    actor = TokenLogprobLM(model)
    p = PPOConfig(advantage="grpo", n_samples_per_prompt=2, kl_mode="off", sampling={"temperature": 1.0})
    exp = make_experience(r, torch.zeros(8), actor, None, None, p, 0.0, micro_batch=4, device="cpu",
                          reuse=True, check=True)
    top, mean = exp.logp_gap
    assert (top <= LOGP_REUSE_MAX_ABS_DIFF) == reused and 0 <= mean <= top, exp.logp_gap
    from rlhfkit.rollout.scoring import actor_logprobs

    with torch.no_grad():
        recomputed = actor_logprobs(actor, r, 1.0)
    want = r.logprobs if reused else recomputed
    assert torch.equal(exp.old_logprobs, want)
    assert top == pytest.approx((r.logprobs - recomputed).abs().max().item())


def test_truncated_is_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5, 7.0]])
    sampler = torch.tensor([[-1.0, -1.0, -2.5, NAN]])
    mask = torch.tensor([[True, True, True, False]])
    # min(e^(old − sampler), 2): e^0 = 1, e^-1 = 0.36787944, e^2 = 7.39 → capped at 2; padding → 0
    w = PF.truncated_is_weights(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.36787944, 2.0, 0.0]]))


def test_bf16_run_measures_the_gap_logs_it_and_stops_reusing(tmp_path, prompts_file):
    """Actor and rollout copy both bf16 (an 'exact' copy): the first step measures the gap, logs it, finds it
    over the bound and recomputes from then on (no second measurement at step 2)."""
    cfg = grpo_config(tmp_path, prompts_file, steps=2, eval_prompts=8, kl_mode="off", rollout_dtype="bfloat16",
                      actor={"learning_rate": 1e-3, "micro_batch_size": 8, "dtype": "bfloat16"})
    out = run_ok(["ppo", str(cfg), "--no-progress"])
    gap = metrics(tmp_path / "run", "rollout/logp_reuse_max_abs_diff")
    assert len(gap) == 1 and gap[0] > LOGP_REUSE_MAX_ABS_DIFF, gap
    assert "recomputing the old log-probs from now on" in out


def test_tis_weights_the_loss_where_the_sampler_differs_on_purpose(tmp_path, prompts_file):
    """fp32 actor, bf16 rollout copy: the sampler's log-probs are kept, the gap logged every step and the
    policy loss weighted by min(π_old/π_sampler, tis_cap)."""
    cfg = grpo_config(tmp_path, prompts_file, steps=2, eval_prompts=8, kl_mode="off", rollout_dtype="bfloat16",
                      tis_cap=1.001, actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    run_ok(["ppo", str(cfg), "--no-progress"])
    run = tmp_path / "run"
    gap, weight = metrics(run, "rollout/logp_reuse_max_abs_diff"), metrics(run, "policy/tis_weight_mean")
    capped = metrics(run, "policy/tis_capped_frac")
    assert len(gap) == 2 and all(g > 0 for g in gap), gap
    assert len(weight) == 2 and all(0.9 < w <= 1.001 and w != 1.0 for w in weight), weight
    assert all(0 < c < 1 for c in capped), capped  # some tokens' ratio exceeds 1.001: capped there


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


def test_critic_starts_in_the_scale_of_the_weighted_reward_with_text_sources(tmp_path, prompts_file, reward_dir):
    """Reward = 0.5 · the RM's normalised score + 2 · share_of_a: the critic (the RM, rescaled) must start
    predicting 0.5·(s − mean)/std + 2·mean(share_of_a), not (s − mean)/std."""
    from rlhfkit.config import load_config
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.train.ppo.trainer import PPOTrainer
    from test_grpo import SHARE_OF_A

    sources = [{"type": "model", "weight": 0.5},
               {"type": "python", "function": SHARE_OF_A, "name": "share_of_a", "weight": 2.0}]
    cfg = ppo_config(tmp_path, prompts_file, reward_dir, steps=1, normalize_scores=True, normalize_samples=16,
                     reward={"sources": sources, "dtype": "float32"})
    raw = yaml.safe_load(cfg.read_text())
    del raw["ppo"]["critic_model"]  # the critic starts as the reward model
    cfg.write_text(yaml.safe_dump(raw))
    trainer = PPOTrainer(load_config(cfg), show_progress=False)
    mean, std = trainer.norm["mean"], trainer.norm["std"]
    # the text part on the same samples the normalisation measured (the same seeds, the same policy)
    text = [trainer.rewards.per_source(*trainer.step_rollouts(step), 8, "cpu")["share_of_a"] for step in range(2)]
    text_mean = float(torch.cat(text).mean())
    assert text_mean > 0
    r = trainer.step_rollouts(0)[0]
    rm = RewardModel.from_pretrained(str(reward_dir)).eval()
    with torch.no_grad():
        s = rm.values(r.input_ids, r.lengths)
        v = trainer.critic.module.rm.values(r.input_ids, r.lengths)
    torch.testing.assert_close(v, 0.5 * (s - mean) / std + 2.0 * text_mean, atol=1e-4, rtol=1e-4)

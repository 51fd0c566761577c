"""PPO on tiny models: sequence layout, experience, learning on a known reward, exact resume, ZeRO-3 on 2 processes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from ppo_known_reward import TargetTokenReward
from rlhfkit.config import ModelConfig, PPOConfig
from rlhfkit.engine.generation import Generation
from rlhfkit.models import load_model_and_tokenizer
from rlhfkit.models.loading import resolve_model_dir
from rlhfkit.models.reward import RewardModel
from rlhfkit.tracking import read_metrics
from rlhfkit.train.common import TokenLogprobLM
from rlhfkit.train.losses import token_logprobs
from rlhfkit.rollout.sampling import response_values, to_rollout
from rlhfkit.rollout.scoring import RewardScorer, actor_logprobs
from rlhfkit.train.ppo.experience import make_experience, whiten_over_ranks
from rlhfkit.train.ppo.reward_sum import RewardSum
from rlhfkit.train.ppo.formulas import masked_whiten
from rlhfkit.train.ppo.models import ValueModel
from test_training import ENV, cli, kill_when, run_ok, synthetic_pairs

EOS = PAD = 2  # the tiny tokenizer's <|im_end|>: pad == eos


def _generation() -> Generation:
    """Two left-padded prompts; row 0 stops early at EOS (then pad == eos), row 1 runs to the limit."""
    return Generation(prompt_ids=torch.tensor([[PAD, 11, 12], [21, 22, 23]]), prompt_lengths=torch.tensor([2, 3]),
                      response_ids=torch.tensor([[31, EOS, PAD, PAD], [41, 42, 43, 44]]),
                      response_lengths=torch.tensor([2, 4]), ended=torch.tensor([True, False]))


def test_rollouts_are_repacked_right_padded_prompt_then_response():
    r = to_rollout(_generation(), PAD)
    assert r.input_ids.tolist() == [[11, 12, 31, EOS, PAD, PAD, PAD], [21, 22, 23, 41, 42, 43, 44]]
    assert r.lengths.tolist() == [4, 7] and r.prompt_lens.tolist() == [2, 3]
    assert r.response_mask().tolist() == [[True, True, False, False], [True, True, True, True]]
    # the actor's targets: the response tokens in sequence positions, the real EOS included
    assert r.token_mask().int().tolist() == [[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]]


def test_critic_value_of_a_token_is_read_just_before_it():
    r = to_rollout(_generation(), PAD)
    values = torch.arange(14, dtype=torch.float).reshape(2, 7)  # value = 7·row + position
    v = response_values(values, r.prompt_lens, r.response_lengths, r.width)
    # row 0: prompt of 2 → response tokens at positions 2, 3, valued at positions 1, 2; row 1: positions 2..5
    assert v.tolist() == [[1, 2, 0, 0], [9, 10, 11, 12]]


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    return model.eval(), tok


def test_actor_logprobs_match_each_sequence_scored_alone(tiny):
    model, _ = tiny
    r = to_rollout(_generation(), PAD)
    batched = actor_logprobs(TokenLogprobLM(model), r)
    for i in range(2):
        seq = r.input_ids[i:i + 1, : int(r.lengths[i])]
        with torch.no_grad():
            alone = token_logprobs(model(seq).logits, seq)[0, int(r.prompt_lens[i]) - 1:]
        n = int(r.response_lengths[i])
        torch.testing.assert_close(batched[i, :n], alone, atol=1e-5, rtol=1e-5)
        assert (batched[i, n:] == 0).all()


def test_experience_puts_the_score_on_the_last_response_token_and_no_kl_against_itself(tiny):
    model, _ = tiny
    r = to_rollout(_generation(), PAD)
    policy = TokenLogprobLM(model)
    critic = ValueModel(RewardModel.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")))).eval()
    scorer = RewardScorer(TargetTokenReward(40, 50))  # row 1's response is all in [40, 50): score 1; row 0's: 0
    p = PPOConfig(kl_coef=0.1, whiten_advantages=False)
    scores = RewardSum(scorer, 1.0, [], None).model_scores(r, micro_batch=1, device="cpu")
    exp = make_experience(r, scores, policy, policy, critic, p, kl_coef=0.1, micro_batch=1, device="cpu")
    assert exp.scores.tolist() == [0.0, 1.0]
    assert (exp.kl == 0).all()  # actor == reference
    # GAE over the response only: returns at the last token = its reward (no bootstrap past the end)
    assert exp.returns[1, 3] == pytest.approx(1.0) and exp.returns[0, 1] == pytest.approx(0.0)
    assert (exp.advantages[0, 2:] == 0).all() and (exp.returns[0, 2:] == 0).all()


def test_score_normalisation_eos_penalty_and_clip_are_applied_in_order(tiny):
    model, _ = tiny
    r = to_rollout(_generation(), PAD)
    policy = TokenLogprobLM(model)
    critic = ValueModel(RewardModel.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")))).eval()
    scorer = RewardScorer(TargetTokenReward(40, 50))
    p = PPOConfig(missing_eos_penalty=-1.0, score_clip=1.5)
    rewards = RewardSum(scorer, 1.0, [], None)
    rewards.score_stats = (0.5, 0.25)
    scores = rewards.total(rewards.per_source(r, [{}, {}], micro_batch=2, device="cpu"))
    exp = make_experience(r, scores, policy, policy, critic, p, kl_coef=0.1, micro_batch=2, device="cpu")
    # row 0: (0 − 0.5)/0.25 = −2 → clipped to −1.5; row 1: (1 − 0.5)/0.25 = 2, no EOS → 1 → inside the clip
    assert exp.shaped_scores.tolist() == [-1.5, 1.0]


def test_whitening_over_ranks_is_masked_whiten_on_one_process():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(whiten_over_ranks(x, mask), masked_whiten(x, mask))


# --- whole runs -----------------------------------------------------------------------------------

def ppo_config(tmp_path: Path, prompts_file: Path, reward_dir: Path | None = None, **ppo) -> Path:
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name_or_path": "tiny-random"},
        "data": {"datasets": [{"name": "d", "path": str(prompts_file)}], "cache_dir": str(tmp_path / "cache"),
                 "max_seq_len": 96, "max_prompt_len": 48, "eval_fraction": 0.2, "phase_ratios": [0, 0, 1]},
        "ppo": {"actor_model": "tiny-random", "critic_model": "tiny-random", "rollout_batch_size": 8,
                "eval_prompts": 8, "sampling": {"max_new_tokens": 8, "temperature": 1.0},
                "reference": {"dtype": "float32"}, "reward": {"dtype": "float32"}, **ppo},
    }
    if reward_dir is not None:
        raw["ppo"]["reward_model"] = str(reward_dir)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(80))


@pytest.fixture
def reward_dir(tmp_path):
    """A tiny reward model on disk (random backbone and head), as `rlhfkit rm` would leave it."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    rm = RewardModel.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")))
    out = tmp_path / "rm"
    RewardModel.save(out, rm.state_dict(), rm.backbone.config, 0.0, 1.0)
    tok.save_pretrained(out)
    return out


def metrics(run: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run / "ppo" / "metrics.jsonl") if key in m]


def test_ppo_raises_a_known_reward_while_kl_stays_finite(tmp_path, prompts_file):
    """Reward = share of response tokens in a target range of 100 ids (a random policy: ~0.1)."""
    cfg = ppo_config(tmp_path, prompts_file, steps=20, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=4,
                     kl_coef=0.02, eval_every=10, eval_prompts=16,
                     actor={"learning_rate": 5e-3, "micro_batch_size": 8},
                     critic={"learning_rate": 3e-3, "micro_batch_size": 8})
    p = subprocess.run([sys.executable, str(REPO / "tests" / "ppo_known_reward.py"), str(cfg)], env=ENV, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "run"
    score, kl = metrics(run, "eval/score"), metrics(run, "eval/kl")
    assert len(score) == 3  # before, at step 10, after
    assert score[0] < 0.2 and score[-1] > 0.4 and score[-1] > 3 * score[0], score
    assert all(np.isfinite(kl)) and kl[-1] > 0 and kl[-1] < 100, kl
    train = read_metrics(run / "ppo" / "metrics.jsonl")
    assert {"objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
            "policy/clipfrac", "val/clipfrac", "val/explained_variance", "time/generation", "time/experience",
            "time/training", "tokens/per_s"} <= set(train[1])
    assert (run / "ppo" / "final" / "model.safetensors").is_file()
    samples = [json.loads(line) for line in (run / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 10, 20} and all(s["prompt"] and "score" in s for s in samples)


def test_eval_prompts_0_runs_no_eval_inside_rl(tmp_path, prompts_file, reward_dir):
    """The pipeline's eval stage judges the final model; eval_prompts 0 spares RL its own before/after evals."""
    cfg = ppo_config(tmp_path, prompts_file, reward_dir, steps=2, eval_every=0, eval_prompts=0,
                     actor={"learning_rate": 1e-3, "micro_batch_size": 4})
    run_ok(["ppo", str(cfg), "--no-progress"])
    logged = read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl")
    assert [m["step"] for m in logged if "loss/policy" in m] == [1, 2]
    assert not [k for m in logged for k in m if k.startswith("eval/")]
    assert (tmp_path / "run" / "ppo" / "final" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="eval_prompts 0 turns them off"):
        PPOConfig(eval_every=5, eval_prompts=0)


def _final(run: Path, what: str = "final") -> dict:
    return load_file(str(run / "ppo" / what / "model.safetensors"))


def test_ppo_resume_after_sigkill_gives_the_same_final_weights(tmp_path, prompts_file, reward_dir):
    """Normalised scores: the resumed run keeps the statistics its checkpoint stored, and the critic its bias."""
    ppo = dict(steps=6, save_every=2, eval_every=0, ppo_epochs=2, mini_batch_size=4, ema_decay=0.9,
               normalize_scores=True, adaptive_kl={"target": 1.0, "horizon": 100},
               actor={"learning_rate": 1e-3, "micro_batch_size": 2}, critic={"learning_rate": 1e-3, "micro_batch_size": 2})
    straight = ppo_config(tmp_path / "a", prompts_file, reward_dir, **ppo)
    run_ok(["ppo", str(straight), "--no-progress"])

    resumed = ppo_config(tmp_path / "b", prompts_file, reward_dir, **ppo)
    ckpt = tmp_path / "b" / "run" / "ppo" / "checkpoints" / "step-0000004" / "COMPLETE"
    kill_when(["ppo", str(resumed), "--no-progress"], ckpt)
    assert not (tmp_path / "b" / "run" / "ppo" / "final").exists()  # it really died mid-run
    out = run_ok(["ppo", str(resumed), "--no-progress"])
    assert "resumed at step 4" in out
    assert "score normalisation kept from" in out and "step-0000004" in out

    a_run, b_run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for key in ("objective/scores", "objective/kl_coef", "loss/value", "loss/policy"):
        assert metrics(a_run, key) == metrics(b_run, key), (key, _first_difference(a_run, b_run))
    for what in ("final", "final-ema"):
        a, b = _final(a_run, what), _final(b_run, what)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (what, k, _first_difference(a_run, b_run))  # exact, fp32 single process


def _first_difference(a_run: Path, b_run: Path) -> str:
    """The first training step whose logged metrics differ between two runs (timings aside), to say where a
    resumed run left the uninterrupted one's path."""
    def by_step(run):
        return {m["step"]: {k: v for k, v in m.items() if not k.startswith(("time/", "tokens/"))}
                for m in read_metrics(run / "ppo" / "metrics.jsonl") if "loss/policy" in m}
    a, b = by_step(a_run), by_step(b_run)
    for step in sorted(a):
        diff = {k: (v, b.get(step, {}).get(k)) for k, v in a[step].items() if b.get(step, {}).get(k) != v}
        if diff:
            return f"step {step} differs first: {diff}"
    return "every step's metrics agree"


def test_two_processes_actor_zero3_reward_zero0_match_one_process(tmp_path, prompts_file, reward_dir):
    """Same global batch of 8 prompts: per-prompt sampling seeds make the rollouts identical, and losses
    are normalised by global token counts, so only float summation order differs."""
    ppo = dict(steps=3, eval_every=0, eval_prompts=8, actor={"learning_rate": 1e-3, "micro_batch_size": 4},
               critic={"learning_rate": 1e-3, "micro_batch_size": 4}, reward={"dtype": "float32", "zero_stage": 0},
               normalize_scores=True)
    one = ppo_config(tmp_path / "one", prompts_file, reward_dir, **ppo)
    run_ok(["ppo", str(one), "--no-progress"])
    ppo["actor"] = {**ppo["actor"], "zero_stage": 3}
    two = ppo_config(tmp_path / "two", prompts_file, reward_dir, **ppo)
    run_ok(["ppo", str(two), "--no-progress"], nproc=2)
    a_run, b_run = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert metrics(a_run, "tokens/generated") == metrics(b_run, "tokens/generated")
    for key in ("score_norm/mean", "score_norm/std", "objective/scores", "objective/kl", "loss/policy", "loss/value",
                "eval/score", "eval/kl"):
        a, b = metrics(a_run, key), metrics(b_run, key)
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (key, a, b)  # stated: 1e-4
    a, b = _final(a_run), _final(b_run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_mismatched_tokenizers_are_an_error_without_retokenize(tmp_path, prompts_file, reward_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_dir)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(reward_dir)
    p = cli(["ppo", str(ppo_config(tmp_path, prompts_file, reward_dir, steps=1)), "--no-progress"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "different tokenizers" in out and "ppo.retokenize" in out


def test_retokenize_scores_the_decoded_text_with_the_reward_tokenizer(tiny):
    """ppo.retokenize: the RM sees prompt + response re-encoded by its own tokenizer, EOS re-appended."""
    from transformers import AutoTokenizer

    _, src = tiny
    dst = AutoTokenizer.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")))
    dst.add_tokens(["bread"])  # a different vocabulary: "bread" is one token for the RM only
    prompt = src("How do I bake bread?", add_special_tokens=False).input_ids
    reply = src(" Knead the bread", add_special_tokens=False).input_ids + [src.eos_token_id]
    r = to_rollout(Generation(torch.tensor([prompt]), torch.tensor([len(prompt)]), torch.tensor([reply]),
                              torch.tensor([len(reply)]), torch.tensor([True])), src.pad_token_id)
    seen = {}

    def reward(ids, lengths, prompt_lens):
        seen.update(ids=ids[0, : int(lengths[0])].tolist(), prompt_len=int(prompt_lens[0]))
        return torch.zeros(1)

    RewardScorer(reward, (src, dst))(r)
    want_prompt = dst("How do I bake bread?", add_special_tokens=False).input_ids
    want_reply = dst(" Knead the bread", add_special_tokens=False).input_ids + [dst.eos_token_id]
    assert seen == {"ids": want_prompt + want_reply, "prompt_len": len(want_prompt)}
    assert want_prompt != prompt  # the RM's tokens really differ


def test_ptx_mixes_the_sft_loss_into_the_actor_update(tmp_path, prompts_file, reward_dir):
    """ptx_coef > 0: phase-1 rows' SFT loss joins the actor loss; with the policy term tiny it must fall."""
    cfg = ppo_config(tmp_path, prompts_file, reward_dir, steps=10, eval_every=0, ptx_coef=1.0, kl_coef=0.0,
                     actor={"learning_rate": 5e-3, "micro_batch_size": 4}, critic={"micro_batch_size": 4})
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["phase_ratios"] = [1, 0, 1]  # phase 1 (SFT rows for ptx) and phase 3 (prompts)
    cfg.write_text(yaml.safe_dump(raw))
    run_ok(["ppo", str(cfg), "--no-progress"])
    ptx = metrics(tmp_path / "run", "ptx/loss")
    assert len(ptx) == 10 and all(np.isfinite(ptx))
    assert ptx[-1] < 0.85 * ptx[0], ptx

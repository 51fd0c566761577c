"""Fixes from the PPO/DPO/RM review: equal forward counts under ZeRO-3, score normalisation on the policy's
own samples, the critic in the normalised scale, truncated sampling, DPO without dropout, PPO logging, and
no non-finite weights published.

Run as a script under torchrun it is the 2-process half of the ZeRO-3 RM-statistics test:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_review_fixes.py OUT.json
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, write_jsonl
from rlhfkit.config import Config, DPOConfig, LoraConfig, ModelConfig, SamplingSettings, load_config
from rlhfkit.engine.sharding import equal_count_batches
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import resolve_model_dir
from rlhfkit.models.reward import RewardModel
from rlhfkit.tracking import read_metrics
from rlhfkit.train.guards import NonFiniteError
from test_ppo import ppo_config
from test_training import ENV, _free_port, synthetic_pairs

TINY = ModelConfig(name_or_path="tiny-random")


# --- equal forward counts on every rank ----------------------------------------------------------

def test_every_rank_gets_as_many_batches_as_the_largest_share_needs():
    # 17 rows over 2 ranks in micro-batches of 8: rank 0 has 9 rows (2 batches), rank 1 has 8 (1 batch)
    r0, r1 = (equal_count_batches(17, rank, 2, 8) for rank in (0, 1))
    assert len(r0) == len(r1) == 2
    assert [rows.tolist() for rows, keep in r0 if keep] == [list(range(8)), [8]]
    assert [rows.tolist() for rows, keep in r1 if keep] == [list(range(9, 17))]
    assert r1[1][1] is False and len(r1[1][0]) == 1  # a stand-in row, its result dropped
    assert all(len(b) == 1 for b in (equal_count_batches(100, r, 4, 8, max_batches=1) for r in range(4)))
    assert equal_count_batches(0, 0, 2, 8) == []


class PairRows:
    """n preference rows of different lengths, as a Blend serves them."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.rows = [{"chosen_ids": rng.integers(10, 900, 6 + i % 5), "rejected_ids": rng.integers(10, 900, 4 + i % 3),
                      "prompt_len": 3} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def row(self, i: int) -> dict:
        return self.rows[i]


def rm_score_stats(zero_stage: int) -> tuple[float, float]:
    """The RM stage's score statistics pass over 17 pairs, micro-batch 8, on a tiny reward model."""
    from rlhfkit.config import ModelConfig, RewardConfig
    from rlhfkit.engine.backend import TrainEngine, param_groups
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.train.reward import score_stats

    torch.manual_seed(0)
    model = RewardModel.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")))
    t = RewardConfig(zero_stage=zero_stage, micro_batch_size=8, dtype="float32")
    engine = TrainEngine(model, t, 10, param_groups(model, 1e-5, 0.0))
    return score_stats(engine, PairRows(17), pad_id=2, micro=8)


def test_rm_score_stats_on_two_zero3_processes_do_not_hang_and_match_one_process(tmp_path):
    """17 rows, 2 ranks, micro-batch 8: one rank has a forward fewer, which hung ZeRO-3's parameter gathers."""
    out = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "test_review_fixes.py"), str(out)]
    p = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers
        p.communicate()
        pytest.fail("the 2-process ZeRO-3 score statistics pass hung")
    assert p.returncode == 0, log[-4000:]
    two = json.loads(out.read_text())
    one = rm_score_stats(zero_stage=0)
    assert two == pytest.approx(list(one), abs=1e-5)


# --- PPO: score normalisation, critic scale, logging, EMA export ----------------------------------

def make_reward_dir(out, score_mean: float, score_std: float):
    """A tiny reward model on disk whose stored training-data statistics are `score_mean`, `score_std`."""
    from rlhfkit.models.loading import load_tokenizer

    torch.manual_seed(1)
    rm = RewardModel.from_pretrained(resolve_model_dir("tiny-random", TINY))
    RewardModel.save(out, rm.state_dict(), rm.backbone.config, score_mean, score_std)
    load_tokenizer(TINY).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """Two PPO steps in this process: normalised scores on an RM whose stored statistics (100, 50) are far
    from its scores, adaptive KL, 2 mini-batches × 2 epochs, EMA. The actor's gradient norms are recorded
    as the optimizer steps produce them."""
    from rlhfkit.train.ppo.trainer import PPOTrainer

    tmp = tmp_path_factory.mktemp("ppo")
    reward = make_reward_dir(tmp / "rm", 100.0, 50.0)
    prompts = write_jsonl(tmp / "prompts.jsonl", synthetic_pairs(80))
    cfg = ppo_config(tmp, prompts, reward, steps=2, eval_every=0, normalize_scores=True, score_clip=None,
                     adaptive_kl={"target": 0.01, "horizon": 10}, kl_coef=0.2, mini_batch_size=4, ppo_epochs=2,
                     ema_decay=0.9, actor={"learning_rate": 1e-3, "micro_batch_size": 2},
                     critic={"learning_rate": 1e-3, "micro_batch_size": 2})
    trainer = PPOTrainer(load_config(cfg), show_progress=False)
    norms = []
    measure = trainer.actor.grad_norm
    trainer.actor.grad_norm = lambda: norms.append(measure()) or norms[-1]
    trainer.train()
    return trainer, read_metrics(tmp / "run" / "ppo" / "metrics.jsonl"), norms


def test_scores_are_normalised_with_the_initial_policys_own_samples(ppo_run):
    trainer, metrics, _ = ppo_run
    first = metrics[0]
    mean, std = first["score_norm/mean"], first["score_norm/std"]
    assert first["score_norm/samples"] == 64  # ⌈64 / rollout batch 8⌉ = 8 rollout batches
    assert (mean, std) != (100.0, 50.0) and std > 0  # not the RM's stored training-data statistics
    step1 = next(m for m in metrics if m["step"] == 1 and "objective/scores" in m)
    # the rollouts' raw scores live on that scale, and the rewards were normalised with exactly these numbers
    assert abs(step1["objective/scores"] - mean) < 3 * std
    assert step1["objective/scores_shaped"] == pytest.approx((step1["objective/scores"] - mean) / std, abs=1e-5)
    saved = json.loads((trainer.out_dir / "checkpoints" / "step-0000002" / "score_stats.json").read_text())
    assert saved == {"mean": mean, "std": std, "samples": 64}


def test_the_logged_kl_coef_is_the_one_the_rewards_used(ppo_run):
    _, metrics, _ = ppo_run
    steps = [m for m in metrics if "objective/kl_coef" in m]
    assert len(steps) == 2 and steps[0]["objective/kl_coef"] == 0.2  # the initial β shaped step 1's rewards
    assert steps[1]["objective/kl_coef"] != 0.2  # the adaptive controller moved it after step 1
    for m in steps:
        assert m["objective/non_score_reward"] == pytest.approx(-m["objective/kl_coef"] * m["objective/kl"], rel=1e-6)


def test_grad_norm_is_the_mean_and_max_over_the_steps_optimizer_steps(ppo_run):
    _, metrics, norms = ppo_run
    assert len(norms) == 2 * 2 * 2  # steps × epochs × mini-batches
    for step, seen in ((1, norms[:4]), (2, norms[4:])):
        m = next(m for m in metrics if m["step"] == step and "policy/grad_norm" in m)
        assert len(set(seen)) == 4
        assert m["policy/grad_norm"] == pytest.approx(float(np.mean(seen)))
        assert m["policy/grad_norm_max"] == pytest.approx(max(seen))
        assert m["val/grad_norm_max"] >= m["val/grad_norm"] > 0


def test_a_non_finite_ema_is_not_written_as_a_model(ppo_run):
    trainer, _, _ = ppo_run
    name = next(iter(trainer.ema.weights))
    trainer.ema.weights[name][0] = float("nan")
    with pytest.raises(NonFiniteError, match="ema_model"):
        trainer.save_checkpoint(99)
    assert not (trainer.out_dir / "checkpoints" / "step-0000099").exists()


def test_resume_force_continues_from_the_checkpoint_under_changed_settings(ppo_run, capsys):
    from rlhfkit.train.ppo.trainer import PPOTrainer

    trainer, _, _ = ppo_run
    cfg = load_config(trainer.out_dir.parent.parent / "config.yaml", ["ppo.steps=3", "ppo.resume=force"])
    again = PPOTrainer(cfg, show_progress=False)
    again.train()
    out = capsys.readouterr().out
    assert "resuming under changed settings (ppo.resume=force): ppo.steps: 2 → 3" in out
    assert "resumed at step 2/3" in out and "score normalisation kept from" in out


def test_a_non_finite_reward_model_is_not_saved(tmp_path):
    rm = RewardModel.from_pretrained(resolve_model_dir("tiny-random", TINY))
    sd = rm.state_dict()
    sd["v_head.weight"] = sd["v_head.weight"].clone().fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="v_head.weight"):
        RewardModel.save(tmp_path / "rm", sd, rm.backbone.config, 0.0, 1.0)
    assert not (tmp_path / "rm").exists()


def test_the_critic_starts_as_the_reward_model_in_the_normalised_scale(tmp_path):
    from rlhfkit.config import CriticConfig
    from rlhfkit.train.ppo.models import build_critic

    reward = make_reward_dir(tmp_path / "rm", 0.0, 1.0)
    raw = {"model": {"name_or_path": "tiny-random"}, "data": {"datasets": [{"name": "d", "path": "unused.jsonl"}]},
           "ppo": {"reward_model": str(reward)}}
    cfg = Config.model_validate(raw)
    ids, lengths = torch.randint(10, 900, (3, 9)), torch.tensor([9, 5, 7])
    rm = RewardModel.from_pretrained(str(reward)).eval()
    critic, _ = build_critic(cfg, CriticConfig(), score_stats=(0.3, 0.02))
    with torch.no_grad():
        want = (rm.values(ids, lengths) - 0.3) / 0.02
        torch.testing.assert_close(critic.eval()(ids, lengths), want, atol=1e-4, rtol=1e-5)
    # saved as PPO saves its critic, and loaded back with its bias
    RewardModel.save(tmp_path / "critic", critic.rm.state_dict(), critic.rm.backbone.config, 0.0, 1.0)
    again = RewardModel.from_pretrained(str(tmp_path / "critic")).eval()
    assert again.v_head.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(again.values(ids, lengths), want, atol=1e-4, rtol=1e-5)
    # a critic_model that is not the reward model keeps its own head
    other, _ = build_critic(Config.model_validate({**raw, "ppo": {**raw["ppo"], "critic_model": "tiny-random"}}),
                            CriticConfig(), score_stats=(0.3, 0.02))
    assert other.rm.v_head.bias is None


# --- truncated sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [{"top_p": 0.9}, {"top_k": 20}])
def test_ppo_refuses_truncated_sampling_and_eval_keeps_it(tmp_path, setting, tiny_tokenizer):
    from rlhfkit.rollout.sampling import sampling_for
    from rlhfkit.train.ppo.trainer import PPOTrainer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(20))
    cfg = ppo_config(tmp_path, prompts, sampling={"max_new_tokens": 8, **setting})
    key = next(iter(setting))
    with pytest.raises(ConfigError, match=f"ppo.sampling.{key} is {setting[key]}: PPO must sample from the full"):
        PPOTrainer(load_config(cfg), show_progress=False)
    sampling, _ = sampling_for(SamplingSettings(**setting), tiny_tokenizer)  # eval and chat sample truncated
    assert (sampling.top_p, sampling.top_k) == (setting.get("top_p", 1.0), setting.get("top_k", 0))


def test_log_probs_of_a_truncated_sampler_are_refused():
    from rlhfkit.engine.generation import SamplingConfig, generate
    from rlhfkit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(TINY)
    prompt = [np.array(tok("Hi").input_ids)]
    with pytest.raises(ValueError, match="untruncated"):
        generate(model.eval(), prompt, tok.pad_token_id, [tok.eos_token_id], SamplingConfig(4, top_p=0.9), [1], True)
    out = generate(model, prompt, tok.pad_token_id, [tok.eos_token_id], SamplingConfig(4), [1], True)
    assert out.response_logprobs is not None


# --- DPO without dropout ---------------------------------------------------------------------------

def model_with_dropout(out, kind: str):
    """A tiny causal LM on disk with dropout 0.5: Llama's attention dropout, or OPT's (as in the OPT recipe)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)
    else:
        config = OPTConfig(vocab_size=1000, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, dropout=0.5, attention_dropout=0.5)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return ModelConfig(name_or_path=str(out))


def pair_batch():
    ids = torch.randint(10, 900, (4, 12))
    return {"input_ids": ids, "lengths": torch.tensor([12, 10, 11, 9]), "prompt_lens": torch.tensor([4, 4, 5, 5])}


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_the_dpo_policy_trains_without_dropout(tmp_path, kind):
    from rlhfkit.train.dpo import dpo_policy, pair_logprobs

    policy, _ = dpo_policy(model_with_dropout(tmp_path / kind, kind), DPOConfig(dtype="float32"))
    policy.train()
    batch = pair_batch()
    with torch.no_grad():
        a, b = pair_logprobs(policy, batch, "cpu"), pair_logprobs(policy, batch, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_the_dpo_lora_reference_pass_has_no_dropout_even_when_the_policy_does(tmp_path, kind):
    from rlhfkit.engine.backend import TrainEngine
    from rlhfkit.train.dpo import dpo_policy, pair_logprobs, reference_logprobs

    t = DPOConfig(dtype="float32", dropout=0.5, lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model, groups = dpo_policy(model_with_dropout(tmp_path / kind, kind), t)
    engine = TrainEngine(model, t, 10, groups)
    engine.train()
    batch = pair_batch()
    first, second = reference_logprobs(engine, None, batch), reference_logprobs(engine, None, batch)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert engine.module.training  # the pass put the training mode back
    with torch.no_grad():
        assert not torch.equal(pair_logprobs(engine, batch, "cpu")[0], pair_logprobs(engine, batch, "cpu")[0])


if __name__ == "__main__":
    from rlhfkit.engine import distributed as D

    stats = rm_score_stats(zero_stage=3)
    if D.is_main():
        with open(sys.argv[1], "w") as f:
            json.dump(list(stats), f)
    D.barrier()

"""Precision by machine (`dtype: auto`) and half-precision copies that stay the function that was trained."""

import logging

import numpy as np
import pytest
import torch

from conftest import make_config, pref_records, write_jsonl
from rlhfkit.config import FrozenModelConfig, ModelConfig, TrainConfig
from rlhfkit.engine import precision as P
from rlhfkit.engine.backend import TrainEngine
from rlhfkit.models.loading import load_causal_lm, resolve_model_dir
from rlhfkit.models.reward import RewardModel
from rlhfkit.train.common import TokenLogprobLM, trainable_causal_lm, write_causal_lm


# --- resolution ------------------------------------------------------------------------------------

@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend to be a CPU with or without native bf16, bf16 matmuls `speedup` times as fast as fp32's
    (no GPU, nothing forced)."""
    def set_kind(native: bool, speedup: float = 2.3):
        monkeypatch.delenv(P.FORCE_FP32_ENV, raising=False)
        monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(P, "cpu_bf16_speedup", lambda: speedup)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return set_kind


def test_auto_is_bf16_only_where_native_and_fp32_elsewhere(cpu_kind, monkeypatch):
    cpu_kind(True)
    assert P.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setenv(P.FORCE_FP32_ENV, "1")  # the switch that measures the fp32 path on a bf16 machine
    assert P.resolve_dtype("auto") == "float32"
    cpu_kind(False)
    assert P.resolve_dtype("auto") == "float32"
    assert P.resolve_dtype("float16") == "float16"
    cpu_kind(True, speedup=0.56)  # AVX512-BF16 without AMX (a measured Xeon): native, but slower than fp32
    assert P.resolve_dtype("auto") == "float32"


def test_the_bf16_probe_is_measured_once_and_shared_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    P.cpu_bf16_speedup.cache_clear()
    first = P.cpu_bf16_speedup()
    assert first > 0 and (tmp_path / "cpu_bf16_speedup.json").is_file()
    P.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(P, "_matmul_seconds", lambda *a: pytest.fail("measured twice"))
    assert P.cpu_bf16_speedup() == first  # another process or stage reads the same answer
    P.cpu_bf16_speedup.cache_clear()


def test_explicit_bf16_without_native_bf16_is_kept_with_one_warning(cpu_kind, caplog):
    cpu_kind(False)
    P._warned.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        assert P.resolve_dtype("bfloat16", "sft.dtype") == "bfloat16"
        assert P.resolve_dtype("bfloat16", "sft.dtype") == "bfloat16"
    warnings = [r.message for r in caplog.records if "sft.dtype" in r.message]
    assert len(warnings) == 1 and "slow" in warnings[0] and "float32" in warnings[0]


def test_every_model_defaults_to_auto_and_frozen_models_follow_the_actor(cpu_kind, tmp_path):
    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    dtypes = [cfg.model.dtype, cfg.sft.dtype, cfg.rm.dtype, cfg.dpo.dtype, cfg.eval.dtype, cfg.ppo.actor.dtype,
              cfg.ppo.critic.dtype, cfg.ppo.reference.dtype, cfg.ppo.reward.dtype, cfg.ppo.rollout_dtype]
    assert set(dtypes) == {"auto"}
    cpu_kind(True)
    cfg.sft.learning_rate = cfg.rm.learning_rate = cfg.ppo.actor.learning_rate = P.BF16_FULL_WEIGHTS_MIN_LR
    r = P.resolve_precision(cfg)
    assert {r.sft.dtype, r.rm.dtype, r.ppo.reference.dtype, r.ppo.rollout_dtype, r.eval.dtype} == {"bfloat16"}
    cpu_kind(False)
    cfg.ppo.actor.dtype = "bfloat16"  # asked for explicitly: kept (slowly); the frozen models and rollouts follow
    r = P.resolve_precision(cfg)
    assert r.sft.dtype == r.eval.dtype == "float32"
    assert r.ppo.actor.dtype == r.ppo.reference.dtype == r.ppo.reward.dtype == r.ppo.rollout_dtype == "bfloat16"
    assert P.resolve_precision(r) == r  # idempotent: a resolved config replays as it is


def test_auto_trains_full_weights_in_fp32_on_a_cpu_where_bf16_updates_would_vanish(cpu_kind, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    cpu_kind(True)
    cfg.sft.learning_rate = 2e-5  # full weights: Adam's ~lr updates are below half a bf16 step of most weights
    cfg.rm.learning_rate = P.BF16_FULL_WEIGHTS_MIN_LR
    cfg.ppo.actor.learning_rate = 1e-5
    cfg.ppo.actor.lora.r = 8  # LoRA factors start at zero: their updates survive at any rate
    r = P.resolve_precision(cfg)
    assert (r.sft.dtype, r.rm.dtype, r.ppo.actor.dtype) == ("float32", "bfloat16", "bfloat16")
    assert r.ppo.reference.dtype == r.ppo.rollout_dtype == r.eval.dtype == "bfloat16"
    cfg.ppo.actor.lora.r = 0  # full weights at 1e-5: the actor trains in fp32, and samples in fp32 (on-policy)
    r = P.resolve_precision(cfg)
    assert r.ppo.actor.dtype == r.ppo.rollout_dtype == r.ppo.reference.dtype == "float32"
    assert "learning rate 2e-05" in P.why_stage("sft")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run is long: its fp32 masters add up
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert P.resolve_precision(cfg).sft.dtype == "bfloat16"


def test_a_stage_logs_and_saves_its_resolved_precision(tmp_path, capsys):
    import yaml

    from rlhfkit.train.common import begin_stage

    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    resolved = begin_stage(cfg, tmp_path / "out", "sft")
    saved = yaml.safe_load((tmp_path / "out" / "resolved_config.yaml").read_text())
    assert resolved.sft.dtype == saved["sft"]["dtype"] == "float32"  # conftest forces the fp32 path
    assert "sft: precision float32 (auto: RLHFKIT_NO_NATIVE_BF16 is set)" in capsys.readouterr().out


# --- casting keeps the function ------------------------------------------------------------------

TOL = 0.0  # stated tolerance: the same weights and buffers in the same precision give identical logits


@pytest.fixture(scope="module")
def tiny_dir():
    return resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))


@pytest.fixture(scope="module")
def ids():
    # long enough that bf16-rounded rotary frequencies change the logits (positions up to 200)
    return torch.tensor(np.random.default_rng(0).integers(3, 1000, (2, 200)))


@pytest.fixture(scope="module")
def trained_bf16(tiny_dir):
    """The causal LM as the bf16 training engine holds it (bf16 weights, fp32 buffers)."""
    t = TrainConfig(dtype="bfloat16", learning_rate=1e-4)
    model, groups = trainable_causal_lm(ModelConfig(name_or_path=tiny_dir), t)
    return TrainEngine(model, t, 10, groups).module.lm


def logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits.float()


def test_a_plain_bf16_cast_is_a_different_function_the_guarded_cast_is_not(tiny_dir, trained_bf16, ids):
    want = logits(trained_bf16, ids)
    naive = load_causal_lm(ModelConfig(name_or_path=tiny_dir), dtype="float32").to(torch.bfloat16)
    assert (logits(naive, ids) - want).abs().max() > 1e-3  # what PPO's frozen models used to be
    guarded = P.cast_params(load_causal_lm(ModelConfig(name_or_path=tiny_dir), dtype="float32"), torch.bfloat16)
    assert (logits(guarded, ids) - want).abs().max() <= TOL
    assert {b.dtype for b in guarded.buffers()} == {torch.float32}


def test_ppo_reference_and_eval_and_chat_and_dpo_reference_match_the_trained_module(tmp_path, tiny_dir,
                                                                                    trained_bf16, ids):
    from rlhfkit.chat import load_chat_model
    from rlhfkit.eval.compare import Comparison
    from rlhfkit.train.dpo import frozen_reference
    from rlhfkit.rollout.scoring import FrozenModel

    want = logits(trained_bf16, ids)
    reference = FrozenModel(load_causal_lm(ModelConfig(name_or_path=tiny_dir), dtype="float32"),
                            FrozenModelConfig(dtype="bfloat16"))
    reference_zero3 = FrozenModel(load_causal_lm(ModelConfig(name_or_path=tiny_dir), dtype="float32"),
                                  FrozenModelConfig(dtype="bfloat16", zero_stage=3))  # DeepSpeed's own cast
    chat_model, _ = load_chat_model(tiny_dir, "bfloat16")
    dpo_ref = frozen_reference(ModelConfig(name_or_path=tiny_dir), "bfloat16")
    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    cfg.eval.policy = cfg.eval.baseline = tiny_dir
    cfg.eval.reward_model, cfg.eval.dtype = str(_reward_dir(tmp_path, tiny_dir)), "bfloat16"
    cmp = Comparison(cfg)
    for name, lm in (("ppo reference", reference.module), ("ppo reference, ZeRO-3", reference_zero3),
                     ("chat", chat_model), ("dpo reference", dpo_ref.lm),
                     ("eval policy", cmp.policy), ("eval baseline", cmp.baseline)):
        assert (logits(lm, ids) - want).abs().max() <= TOL, name


def _reward_dir(tmp_path, tiny_dir):
    out = tmp_path / "rm"
    if not (out / "config.json").is_file():
        rm = RewardModel.from_pretrained(tiny_dir)
        RewardModel.save(out, rm.state_dict(), rm.config, 0.0, 1.0)
    return out


def test_ppo_reward_and_eval_judge_match_the_trained_reward_model(tmp_path, tiny_dir, ids):
    from rlhfkit.eval.compare import Comparison
    from rlhfkit.rollout.scoring import FrozenModel, load_reward_model

    rm_dir = str(_reward_dir(tmp_path, tiny_dir))
    t = TrainConfig(dtype="bfloat16", learning_rate=1e-4)
    trained = RewardModel.from_pretrained(rm_dir)
    engine = TrainEngine(trained, t, 10, [{"params": [p for p in trained.parameters()]}])
    lengths = torch.tensor([200, 150])
    with torch.no_grad():
        want = engine.module.score(ids, lengths)
    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    reward = FrozenModel(load_reward_model(rm_dir, cfg), FrozenModelConfig(dtype="bfloat16"))
    cfg.eval.policy = cfg.eval.baseline = tiny_dir
    cfg.eval.reward_model, cfg.eval.dtype = rm_dir, "bfloat16"
    judge = Comparison(cfg).judges["rm"].reward
    for name, model in (("ppo reward", reward), ("eval judge", judge)):
        with torch.no_grad():
            assert (model(ids, lengths) - want).abs().max() <= TOL, name


def test_rollout_copy_matches_the_trained_actor(tiny_dir, ids):
    from rlhfkit.rollout.sampling import RolloutPolicy

    t = TrainConfig(dtype="bfloat16", learning_rate=1e-4, dropout=0.0)
    model, groups = trainable_causal_lm(ModelConfig(name_or_path=tiny_dir), t)
    engine = TrainEngine(model, t, 10, groups)
    copy = RolloutPolicy(engine, t, torch.bfloat16)
    assert copy.exact  # full fine-tune at the actor's precision: its sampling log-probs are PPO's old log-probs
    assert (logits(copy.model, ids) - logits(engine.module.lm, ids)).abs().max() <= TOL
    lora = t.model_copy(update={"lora": t.lora.model_copy(update={"r": 4})})
    model, groups = trainable_causal_lm(ModelConfig(name_or_path=tiny_dir), lora)
    assert not RolloutPolicy(TrainEngine(model, lora, 10, groups), lora, torch.bfloat16).exact


# --- PPO at step 0 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,lora,reuse", [("bfloat16", 8, True), ("float32", 0, False), ("float32", 0, True)])
def test_ppo_step0_kl_between_actor_and_reference_is_zero(tmp_path, dtype, lora, reuse):
    """Reference at the actor's precision (the default): the same function at step 0. When the old log-probs
    come from the actor's forward, like the reference's, the KL is exactly 0. A full fine-tune that reuses
    the sampler's log-probs (KV-cached decoding, the same weights) gets 0 up to float rounding."""
    from rlhfkit.tracking import read_metrics
    from rlhfkit.train.ppo.trainer import run_ppo
    from test_ppo import ppo_config
    from test_training import synthetic_pairs
    import yaml
    from rlhfkit.config import load_config

    prompts = write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(40))
    path = ppo_config(tmp_path, prompts, steps=1, eval_every=0, eval_prompts=4,
                      actor={"dtype": dtype, "learning_rate": 1e-3, "lora": {"r": lora}},
                      critic={"dtype": dtype, "learning_rate": 1e-3}, reuse_rollout_logprobs=reuse)
    raw = yaml.safe_load(path.read_text())
    del raw["ppo"]["reference"]  # default: auto → the actor's precision
    path.write_text(yaml.safe_dump(raw))
    run_ppo(load_config(path), show_progress=False, reward_model=_LengthReward())
    rows = read_metrics(tmp_path / "run" / "ppo" / "metrics.jsonl")
    eval_kl = [r["eval/kl"] for r in rows if "eval/kl" in r]
    step_kl = [r["objective/kl"] for r in rows if "objective/kl" in r]
    assert eval_kl[0] == 0.0  # both through a full forward
    if lora or not reuse:
        assert step_kl[0] == 0.0
    else:
        assert step_kl[0] != 0.0 and abs(step_kl[0]) < 1e-4  # the sampler's log-probs were used


class _LengthReward(torch.nn.Module):
    def forward(self, input_ids, lengths, prompt_lens):
        return (lengths - prompt_lens).float()


def test_reused_rollout_logprobs_are_the_actors_logprobs(tiny_dir):
    """fp32 full fine-tune: the sampler's log-probs equal a fresh actor forward (stated tolerance 1e-5), and
    make_experience uses them instead of calling the actor."""
    from rlhfkit.config import PPOConfig
    from rlhfkit.rollout.scoring import actor_logprobs
    from rlhfkit.train.ppo.experience import make_experience
    from rlhfkit.rollout.sampling import RolloutPolicy, concat_rollouts, sample_rollouts, sampling_for
    from rlhfkit.models.loading import load_tokenizer

    t = TrainConfig(dtype="float32", learning_rate=1e-4, dropout=0.0)
    model, groups = trainable_causal_lm(ModelConfig(name_or_path=tiny_dir), t)
    engine = TrainEngine(model, t, 10, groups)
    engine.eval()
    copy = RolloutPolicy(engine, t, torch.float32)
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_dir))
    p = PPOConfig(sampling={"max_new_tokens": 12, "temperature": 0.7})
    sampling, stop = sampling_for(p.sampling, tok)
    prompts = [np.array(tok(f"question {i} about bread").input_ids) for i in range(4)]
    r = concat_rollouts(sample_rollouts(copy.model, prompts, [1, 2, 3, 4], 4, tok.pad_token_id, stop, sampling,
                                        return_logprobs=True), tok.pad_token_id)
    fresh = actor_logprobs(engine, r, 0.7)
    assert r.logprobs.shape == fresh.shape
    assert (r.logprobs - fresh).abs().max() < 1e-5

    def no_actor(*a, **k):
        raise AssertionError("the actor forward should be skipped")

    frozen = TokenLogprobLM(engine.module.lm)
    exp = make_experience(r, torch.zeros(len(r.lengths)), no_actor, frozen, lambda ids, lengths: torch.zeros(ids.shape),
                          p, 0.1, 2, "cpu")
    assert torch.equal(exp.old_logprobs, r.logprobs)

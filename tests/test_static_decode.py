"""The static-shape decoding path (StaticCache, bucketed length, optional torch.compile) samples exactly what
the dynamic loop samples, reuses its cache per shape, and is threaded through rollouts, PPO and eval."""

import contextlib

import numpy as np
import pytest
import torch

from rlhfkit.config import ModelConfig, PPOConfig, TrainConfig
from rlhfkit.engine.generation import BUCKET, SamplingConfig, StaticDecoder, generate, resolve_decoding
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_model_and_tokenizer

TEXTS = ["Human: How do I bake bread? Assistant:", "Hi", "What is the capital of France, and why?", "ok then"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama in fp32 (eval mode) and its tokenizer."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    return model.eval(), tok


def prompts_of(tok, texts):
    return [np.array(tok(t).input_ids) for t in texts]


def assert_same(a, b):
    """Same tokens, lengths and ends; log-probs to 1e-5 (attention over a longer, masked cache rounds differently)."""
    assert torch.equal(a.response_lengths, b.response_lengths) and torch.equal(a.ended, b.ended)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.prompt_ids, b.prompt_ids)
    if a.response_logprobs is not None:
        assert (a.response_logprobs - b.response_logprobs).abs().max() < 1e-5


def stop_tokens(model, tok, prompts, sampling, seeds):
    """EOS plus a token the dynamic path samples early in row 0, so that rows stop at different steps."""
    free = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], sampling, seeds)
    return [tok.eos_token_id, int(free.response_ids[0, 2])]


def test_static_path_samples_the_tokens_of_the_dynamic_path(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, TEXTS)  # left-padded to the longest: different amounts of padding per row
    static = StaticDecoder(model, compiled=False, setting="test")
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0)
    seeds = [11, 12, 13, 14]
    stops = stop_tokens(model, tok, prompts, sampling, seeds)
    dynamic = generate(model, prompts, tok.pad_token_id, stops, sampling, seeds, return_logprobs=True)
    assert dynamic.ended.any() and (dynamic.response_lengths < sampling.max_new_tokens).any()
    assert len(set(dynamic.response_lengths.tolist())) > 1
    assert_same(dynamic, generate(model, prompts, tok.pad_token_id, stops, sampling, seeds, True, static))
    greedy = SamplingConfig(max_new_tokens=16, do_sample=False)
    assert_same(generate(model, prompts, tok.pad_token_id, stops, greedy, return_logprobs=True),
                generate(model, prompts, tok.pad_token_id, stops, greedy, return_logprobs=True, static=static))


def test_cache_is_reused_across_calls_in_the_same_bucket(tiny):
    model, tok = tiny
    static = StaticDecoder(model, compiled=False, setting="test")
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8)
    short, longer = prompts_of(tok, TEXTS[:2]), prompts_of(tok, TEXTS[2:])
    assert max(map(len, short)) != max(map(len, longer))  # two widths, one bucket
    for prompts, seeds in ((short, [1, 2]), (longer, [3, 4]), (short, [1, 2])):
        got = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], sampling, seeds, True, static)
        assert_same(generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], sampling, seeds, True), got)
    assert list(static.buffers) == [(2, BUCKET)]
    cache = static.buffers[(2, BUCKET)][0]
    generate(model, short, tok.pad_token_id, [tok.eos_token_id], SamplingConfig(max_new_tokens=BUCKET), [1, 2],
             static=static)  # width + 64 new tokens: the next bucket, its own cache
    assert list(static.buffers) == [(2, BUCKET), (2, 2 * BUCKET)] and static.buffers[(2, BUCKET)][0] is cache


def test_a_static_decoder_belongs_to_one_model(tiny):
    model, tok = tiny
    other, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    with pytest.raises(ValueError, match="another model"):
        generate(model, prompts_of(tok, TEXTS[:1]), tok.pad_token_id, [tok.eos_token_id], SamplingConfig(4), [1],
                 static=StaticDecoder(other, compiled=False, setting="test"))


def _no_compiler_reason() -> str | None:
    """Why inductor cannot build C++ kernels here (the compiled path on a CPU), or None when it can."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - whatever inductor's compiler search raises is the reason
        return f"inductor finds no C++ compiler: {e}"
    return None


def test_compiled_step_on_cpu_samples_the_same_tokens(tiny):
    """Inductor (plain mode on a CPU): one compile per shape, reused by a call of another width in the same
    bucket; a new shape compiles in its own region, whatever torch's per-function recompile limit."""
    reason = _no_compiler_reason()
    if reason:
        pytest.skip(reason)
    from torch._dynamo.utils import counters

    from rlhfkit.engine.generation import _OWN_REGION

    model, tok = tiny
    compiled = StaticDecoder(model, compiled=True, setting="test")
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1) if _OWN_REGION else contextlib.nullcontext():
        for texts, seeds in ((TEXTS[:2], [5, 6]), (TEXTS[2:], [7, 8]), (TEXTS[:1], [9])):
            prompts = prompts_of(tok, texts)
            assert_same(generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], sampling, seeds, True),
                        generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], sampling, seeds, True,
                                 compiled))
    assert list(compiled.buffers) == [(2, BUCKET), (1, BUCKET)]
    assert counters["stats"]["unique_graphs"] == 2  # batch 2 once for both widths, then batch 1


def test_a_step_that_cannot_compile_is_a_config_error_naming_the_setting(tiny, monkeypatch):
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=no_compiler, dynamic=False))
    model, tok = tiny
    static = StaticDecoder(model, compiled=True, setting="ppo.rollout_decoding")
    with pytest.raises(ConfigError, match=r"ppo\.rollout_decoding: compiled decoding could not compile.*no C\+\+ "
                                          r"compiler.*static"):
        generate(model, prompts_of(tok, TEXTS[:1]), tok.pad_token_id, [tok.eos_token_id], SamplingConfig(4), [1],
                 static=static)


def test_decoding_settings(monkeypatch):
    assert PPOConfig().rollout_decoding == "auto" and PPOConfig(rollout_decoding="static").rollout_decoding == "static"
    with pytest.raises(ValueError, match="rollout_decoding"):
        PPOConfig(rollout_decoding="graphs")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_decoding("auto") == "dynamic" and resolve_decoding("compiled") == "compiled"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_decoding("auto") == "compiled"


def test_rollout_policy_with_static_decoding_gives_the_same_rollouts():
    """The PPO rollout copy: ppo.rollout_decoding static against dynamic, through sample_rollouts in two
    generation batches (4 and a remainder of 2), with the sampler's log-probs."""
    from rlhfkit.engine.backend import TrainEngine
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.rollout.sampling import RolloutPolicy, concat_rollouts, sample_rollouts, sampling_for
    from rlhfkit.train.common import trainable_causal_lm

    tiny_dir = resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))
    t = TrainConfig(dtype="float32", learning_rate=1e-4, dropout=0.0)
    model, groups = trainable_causal_lm(ModelConfig(name_or_path=tiny_dir), t)
    engine = TrainEngine(model, t, 10, groups)
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=tiny_dir))
    sampling, stop = sampling_for(PPOConfig(sampling={"max_new_tokens": 16, "temperature": 0.7}).sampling, tok)
    prompts = prompts_of(tok, [f"question {i} about {'bread ' * i}" for i in range(6)])
    out = {}
    for decoding in ("dynamic", "static"):
        policy = RolloutPolicy(engine, t, torch.float32, decoding)
        assert (policy.decoder is None) == (decoding == "dynamic")
        out[decoding] = concat_rollouts(sample_rollouts(policy.model, prompts, list(range(6)), 4, tok.pad_token_id,
                                                        stop, sampling, True, policy.decoder), tok.pad_token_id)
    a, b = out["dynamic"], out["static"]
    for key in ("input_ids", "lengths", "prompt_lens", "response_lengths", "ended"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5


def test_eval_answers_with_static_decoding_are_the_dynamic_answers(tmp_path):
    from conftest import make_config
    from rlhfkit.eval.compare import Comparison
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.models.reward import RewardModel

    tiny_dir = resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))
    rm = RewardModel.from_pretrained(tiny_dir)
    RewardModel.save(tmp_path / "rm", rm.state_dict(), rm.config, 0.0, 1.0)
    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    cfg.eval.policy = cfg.eval.baseline = tiny_dir
    cfg.eval.reward_model, cfg.eval.batch_size = str(tmp_path / "rm"), 3
    cfg.eval.sampling.max_new_tokens = 12
    cfg.eval.decoding = "static"
    cmp = Comparison(cfg)
    assert all(isinstance(cmp.static[m], StaticDecoder) for m in (cmp.policy, cmp.baseline))
    prompts = prompts_of(cmp.tokenizer, TEXTS)
    static = [cmp.answer(m, prompts) for m in (cmp.policy, cmp.baseline)]
    cmp.static = dict.fromkeys(cmp.static)  # eval.decoding: dynamic
    for model, answers in zip((cmp.policy, cmp.baseline), static):
        for a, b in zip(cmp.answer(model, prompts), answers):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.lengths, b.lengths)


class _LengthReward(torch.nn.Module):
    def forward(self, input_ids, lengths, prompt_lens):
        return (lengths - prompt_lens).float()


def test_ppo_with_static_rollouts_trains_as_with_dynamic_ones(tmp_path):
    """One PPO step each way: the same rollouts (scores are response lengths), the same update, and the same
    samples after it, drawn by the static decoder from the refreshed (copied in place) weights."""
    from conftest import write_jsonl
    from rlhfkit.config import load_config
    from rlhfkit.tracking import read_metrics
    from rlhfkit.train.ppo.trainer import run_ppo
    from test_ppo import ppo_config
    from test_training import synthetic_pairs

    prompts = write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(40))
    runs = {}
    for decoding in ("dynamic", "static"):
        path = ppo_config(tmp_path / decoding, prompts, steps=1, eval_every=0, eval_prompts=4, samples_logged=4,
                          rollout_decoding=decoding, actor={"dtype": "float32", "learning_rate": 1e-2},
                          critic={"dtype": "float32"})
        run_ppo(load_config(path), show_progress=False, reward_model=_LengthReward())
        out = tmp_path / decoding / "run" / "ppo"
        metrics = [{k: v for k, v in row.items() if not k.startswith(("time", "tokens/"))}
                   for row in read_metrics(out / "metrics.jsonl")]
        runs[decoding] = metrics, (out / "samples.jsonl").read_text()
    (dyn_metrics, dyn_samples), (st_metrics, st_samples) = runs["dynamic"], runs["static"]
    assert st_samples == dyn_samples
    assert len(st_metrics) == len(dyn_metrics)
    for a, b in zip(dyn_metrics, st_metrics):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key

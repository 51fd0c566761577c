"""`rlhfkit eval`: the statistics of a prompt set (stats.py, numbers worked out by hand), their place in
eval.json's summary and the report, and judges whose tokenizer differs from the policy's (ppo.retokenize)."""

import json

import numpy as np
import pytest
import torch

from conftest import pref_records, write_jsonl
from rlhfkit.config import Config, ModelConfig
from rlhfkit.engine.generation import Generation
from rlhfkit.errors import ConfigError
from rlhfkit.eval import stats as S
from rlhfkit.eval.compare import Comparison, format_table
from rlhfkit.eval.report import build_report
from rlhfkit.models.loading import resolve_model_dir
from rlhfkit.models.reward import RewardModel
from rlhfkit.train.batching import collate_pairs
from rlhfkit.rollout.sampling import to_rollout

BOOT = S.Bootstrap(resamples=2000, seed=3)


def figures(final, sft, final_len=None, sft_len=None, kl=None, **judges) -> dict:
    n = len(final)
    final_len = np.full(n, 10) if final_len is None else final_len
    sft_len = np.full(n, 10) if sft_len is None else sft_len
    finals = {"rm": np.asarray(final, float), **{j: np.asarray(v[0], float) for j, v in judges.items()}}
    sfts = {"rm": np.asarray(sft, float), **{j: np.asarray(v[1], float) for j, v in judges.items()}}
    return S.set_statistics(finals, sfts, final_len, sft_len, np.zeros(n) if kl is None else kl, BOOT)


def flags(s: dict) -> list[str]:
    return [f["flag"] for f in s["flags"]]


# --- statistics ----------------------------------------------------------------------------------------

def test_identical_models_gain_exactly_zero_and_win_one_half():
    scores = np.random.default_rng(0).normal(size=30)
    s = figures(scores, scores)
    assert s["rm_gain"] == 0.0 and s["rm_gain_ci"] == [0.0, 0.0]
    assert s["rm_win_rate"] == 0.5 and s["rm_win_rate_ci"] == [0.5, 0.5]
    assert s["rm_gain_at_equal_length"] == 0.0 and s["rm_gain_at_equal_length_ci"] == [0.0, 0.0]
    assert s["rm_final_score_ci"] == s["rm_sft_score_ci"] and s["rm_final_score_ci"][0] < s["rm_final_score"]
    assert flags(s) == []


def test_a_known_shift_is_the_gain_on_every_resample():
    sft = np.random.default_rng(1).normal(size=25)
    s = figures(sft + 0.3, sft)
    assert s["rm_gain"] == pytest.approx(0.3) and s["rm_gain_ci"] == pytest.approx([0.3, 0.3])
    assert s["rm_win_rate"] == 1.0 and s["rm_win_rate_ci"] == [1.0, 1.0]
    # the scores themselves vary from prompt to prompt: their means have real intervals, shifted by 0.3
    assert np.subtract(s["rm_final_score_ci"], s["rm_sft_score_ci"]) == pytest.approx([0.3, 0.3])


def test_two_prompts_bootstrap_by_hand():
    """Gains 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the central 95%
    spans [0, 1]; wins 0 and 1 likewise."""
    s = figures([0.0, 1.0], [0.0, 0.0])
    assert s["rm_gain"] == 0.5 and s["rm_gain_ci"] == [0.0, 1.0]
    assert s["rm_win_rate"] == 0.75 and s["rm_win_rate_ci"] == [0.5, 1.0]  # a tie counts half
    assert s["rm_gain_at_equal_length"] is None  # a line needs 3 prompts


def test_one_prompt_has_figures_but_no_intervals_and_no_verdicts():
    s = figures([2.0], [1.0], final_len=np.array([30]), sft_len=np.array([10]), kl=np.array([50.0]))
    assert s["rm_gain"] == 1.0 and s["rm_win_rate"] == 1.0 and s["kl_to_sft"] == 50.0
    assert s["rm_gain_ci"] is None and s["rm_win_rate_ci"] is None and s["kl_to_sft_ci"] is None
    assert s["rm_gain_at_equal_length"] is None
    assert flags(s) == ["few_prompts"]  # nothing is significant, so nothing is length- or KL-driven


def test_equal_length_gain_is_the_least_squares_intercept():
    # gain = 1 + 1·Δlength through (0, 1), (2, 3), (4, 5); the policy is longer by 2 tokens on average
    s = figures([1.0, 3.0, 5.0], [0.0, 0.0, 0.0], final_len=np.array([10, 12, 14]), sft_len=np.array([10, 10, 10]))
    assert s["rm_gain"] == pytest.approx(3.0) and s["rm_gain_at_equal_length"] == pytest.approx(1.0)
    assert s["rm_score_per_token"] == pytest.approx(1.0) and s["length_diff"] == pytest.approx(2.0)
    assert s["rm_gain_at_equal_length_ci"] is None  # 3 prompts: 1 resample in 9 has one length difference only


def test_equal_lengths_leave_the_gain_as_it_is_and_a_constant_length_gap_cannot_be_separated():
    gain = np.random.default_rng(2).normal(0.5, 1.0, size=30)
    same = figures(gain, np.zeros(30))
    assert same["rm_gain_at_equal_length"] == pytest.approx(same["rm_gain"])
    assert same["rm_gain_at_equal_length_ci"] == pytest.approx(same["rm_gain_ci"])
    assert same["rm_score_per_token"] is None
    gap = figures(gain, np.zeros(30), final_len=np.full(30, 15))  # always 5 tokens longer
    assert gap["rm_gain_at_equal_length"] is None and not gap["rm_length_driven"]


def test_a_gain_that_is_all_length_is_flagged():
    rng = np.random.default_rng(4)
    sft_len = rng.integers(10, 40, size=40)
    final_len = sft_len + rng.integers(0, 30, size=40)  # longer, by varying amounts
    sft = rng.normal(size=40)
    s = figures(sft + 0.05 * (final_len - sft_len), sft, final_len, sft_len)
    assert S.significant_gain(s["rm_gain_ci"]) and s["rm_gain"] > 0.5
    assert abs(s["rm_gain_at_equal_length"]) < 1e-9 and s["rm_score_per_token"] == pytest.approx(0.05)
    assert s["rm_length_driven"] and flags(s) == ["length_driven"]
    assert "at equal length" in s["flags"][0]["reason"]


def test_a_gain_that_more_than_halves_at_equal_length_is_flagged():
    rng = np.random.default_rng(4)
    sft_len = rng.integers(10, 40, size=40)
    final_len = sft_len + rng.integers(0, 30, size=40)
    sft = rng.normal(size=40)
    s = figures(sft + 0.3 + 0.05 * (final_len - sft_len), sft, final_len, sft_len)
    assert s["rm_gain_at_equal_length"] == pytest.approx(0.3) and S.significant_gain(s["rm_gain_at_equal_length_ci"])
    assert s["rm_gain"] > 2 * 0.3 and flags(s) == ["length_driven"]


def test_a_gain_at_any_length_is_not_flagged_as_length_driven():
    rng = np.random.default_rng(5)
    sft_len = rng.integers(10, 40, size=40)
    final_len = sft_len + rng.integers(0, 30, size=40)
    sft = rng.normal(size=40)
    s = figures(sft + 0.8 + rng.normal(0, 0.1, size=40), sft, final_len, sft_len)
    assert s["rm_gain_at_equal_length"] == pytest.approx(0.8, abs=0.1)
    assert S.significant_gain(s["rm_gain_at_equal_length_ci"]) and not s["rm_length_driven"]
    assert flags(s) == []


def test_a_gain_that_holds_at_equal_length_with_a_wide_interval_is_inconclusive_not_length_driven():
    """Final is 10-30 tokens longer on every prompt, so the equal-length gain is an extrapolation with a wide
    interval: at 30 prompts it reaches 0 although the estimate is above the raw gain. Not significant is not
    length-driven."""
    rng = np.random.default_rng(7)
    sft_len = rng.integers(10, 40, size=30)
    final_len = sft_len + rng.integers(10, 30, size=30)
    sft = rng.normal(size=30)
    s = figures(sft + 0.6 + rng.normal(0, 0.8, size=30), sft, final_len, sft_len)
    assert S.significant_gain(s["rm_gain_ci"]) and s["rm_gain_at_equal_length"] > s["rm_gain"]
    assert s["rm_gain_at_equal_length_ci"][0] < 0
    assert not s["rm_length_driven"] and flags(s) == ["length_inconclusive"]
    assert "cannot tell" in s["flags"][0]["reason"]


def test_reward_hacking_risk_when_the_second_judge_does_not_confirm_the_gain():
    rng = np.random.default_rng(6)
    sft, noise = rng.normal(size=30), rng.normal(size=30)
    confirmed = figures(sft + 1.0, sft, judge2=(sft + 0.5, sft))
    assert flags(confirmed) == [] and S.significant_gain(confirmed["judge2_gain_ci"])
    unconfirmed = figures(sft + 1.0, sft, kl=np.full(30, 2.0), judge2=(noise, noise[::-1]))
    assert flags(unconfirmed) == ["reward_hacking_risk"]
    assert "not confirmed by judge2" in unconfirmed["flags"][0]["reason"] and "2.00 nats" in unconfirmed["flags"][0]["reason"]


def test_reward_hacking_risk_on_one_judge_only_above_the_kl_threshold():
    sft = np.random.default_rng(7).normal(size=30)
    assert flags(figures(sft + 1.0, sft, kl=np.full(30, S.KL_RISK_NATS - 1))) == []
    far = figures(sft + 1.0, sft, kl=np.full(30, S.KL_RISK_NATS + 1))
    assert flags(far) == ["reward_hacking_risk"] and "rests on that judge alone" in far["flags"][0]["reason"]
    assert flags(figures(sft - 1.0, sft, kl=np.full(30, 50.0))) == []  # no gain, nothing to hack


def test_the_bootstrap_is_seeded():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=20), rng.normal(size=20)
    args = ({"rm": a}, {"rm": b}, np.full(20, 5), np.full(20, 5), np.zeros(20))
    assert S.set_statistics(*args, BOOT) == S.set_statistics(*args, BOOT)
    assert S.set_statistics(*args, BOOT)["rm_gain_ci"] != S.set_statistics(*args, S.Bootstrap(seed=4))["rm_gain_ci"]


def test_console_summary_and_report_show_the_intervals_and_flags(tmp_path):
    sft = np.random.default_rng(9).normal(size=8)
    s = figures(sft + 0.25, sft)
    s.update(prompts=8, final_length=10.0, sft_length=10.0, final_eos_rate=1.0, sft_eos_rate=1.0)
    results = {"sets": {"phase3_eval": s}, "rm_accuracy": 0.7}
    text = format_table(results)
    assert "gain +0.250 [+0.250, +0.250] 95% CI, win 1.00 [1.00, 1.00]" in text
    assert "phase3_eval flag few_prompts: 8 prompts" in text
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(results))
    page = build_report(tmp_path).read_text()
    assert 'id="eval-intervals"' in page and "+0.250 [+0.250, +0.250]" in page and "few_prompts" in page


# --- judges with another tokenizer ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_tokenizers(tmp_path_factory):
    """A policy whose tokenizer knows "bread" as one extra token (id 1000) and a reward model with the plain
    1000-token tiny tokenizer: the policy's ids are not the RM's (id 1000 is not even in its embedding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("mixed")
    tiny = resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))
    policy_tok = AutoTokenizer.from_pretrained(tiny)
    policy_tok.add_tokens(["bread"])
    policy = AutoModelForCausalLM.from_pretrained(tiny)
    policy.resize_token_embeddings(len(policy_tok))
    policy.save_pretrained(tmp / "policy")
    policy_tok.save_pretrained(tmp / "policy")
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny)
    RewardModel.save(tmp / "rm", rm.state_dict(), rm.config, 0.0, 1.0)
    rm_tok = AutoTokenizer.from_pretrained(tiny)
    rm_tok.save_pretrained(tmp / "rm")
    prefs = write_jsonl(tmp / "prefs.jsonl", pref_records(60))  # every prompt asks about bread
    return {"tmp": tmp, "policy": tmp / "policy", "rm": tmp / "rm", "prefs": prefs, "policy_tok": policy_tok,
            "rm_tok": rm_tok}


def mixed_config(m: dict, out: str, model: str, retokenize: bool = True, **eval_extra) -> Config:
    return Config.model_validate({
        "run": {"output_dir": str(m["tmp"] / out)}, "model": {"name_or_path": model},
        "data": {"datasets": [{"name": "prefs", "path": str(m["prefs"])}], "cache_dir": str(m["tmp"] / "cache"),
                 "max_seq_len": 128, "max_prompt_len": 64, "eval_fraction": 0.3, "phase_ratios": [0, 1, 0]},
        "eval": {"policy": str(m["policy"]), "baseline": str(m["policy"]), "reward_model": str(m["rm"]),
                 "batch_size": 4, **eval_extra},
        "ppo": {"retokenize": retokenize}})


def test_a_judge_with_another_tokenizer_scores_the_text_in_its_own_tokens(mixed_tokenizers):
    m = mixed_tokenizers
    src, dst = m["policy_tok"], m["rm_tok"]
    cmp = Comparison(mixed_config(m, "run", str(m["policy"])))
    prompt = src("How do I bake bread?", add_special_tokens=False).input_ids
    reply = src(" Knead the bread", add_special_tokens=False).input_ids + [src.eos_token_id]
    assert 1000 in prompt  # the policy's own token for "bread"
    r = to_rollout(Generation(torch.tensor([prompt]), torch.tensor([len(prompt)]), torch.tensor([reply]),
                              torch.tensor([len(reply)]), torch.tensor([True])), src.pad_token_id)
    got = cmp.judges["rm"](r)
    seq = dst("How do I bake bread?", add_special_tokens=False).input_ids + \
        dst(" Knead the bread", add_special_tokens=False).input_ids + [dst.eos_token_id]
    rm = RewardModel.from_pretrained(str(m["rm"])).eval()
    with torch.no_grad():
        want = rm.score(torch.tensor([seq]), torch.tensor([len(seq)]))
    torch.testing.assert_close(got, want)


def test_rm_accuracy_scores_the_pairs_in_the_rms_own_tokens(mixed_tokenizers):
    """The run's data is in the policy's tokens; the expected accuracy comes from the same pairs prepared
    with the RM's tokenizer and scored by the RM directly."""
    from rlhfkit.data.prepare import load_phase, prepare
    from rlhfkit.train.batching import Blend

    m = mixed_tokenizers
    cfg = mixed_config(m, "run", str(m["policy"]))
    prepare(cfg, show_progress=False)
    accuracy = Comparison(cfg).rm_accuracy()
    own = mixed_config(m, "rm_tokens", str(m["rm"]))
    prepare(own, show_progress=False)
    rows = Blend([t for _, t in load_phase(own.output_dir / "data", 2, "eval")])
    policy_rows = Blend([t for _, t in load_phase(cfg.output_dir / "data", 2, "eval")])
    assert len(rows) == len(policy_rows) >= 10
    assert any(1000 in policy_rows.row(i)["chosen_ids"] for i in range(len(rows)))
    batch = collate_pairs([rows.row(i) for i in range(len(rows))], m["rm_tok"].pad_token_id)
    rm = RewardModel.from_pretrained(str(m["rm"])).eval()
    with torch.no_grad():
        scores = rm.score(batch["input_ids"], batch["lengths"])
    want = float((scores[:len(rows)] > scores[len(rows):]).float().mean())
    assert accuracy == pytest.approx(want)


def test_a_judge_with_another_tokenizer_needs_ppo_retokenize(mixed_tokenizers):
    m = mixed_tokenizers
    with pytest.raises(ConfigError, match="ppo.retokenize") as e:
        Comparison(mixed_config(m, "run", str(m["policy"]), retokenize=False))
    assert str(m["rm"]) in str(e.value)


# --- text rewards (eval.rewards) and the prompt records' metadata ----------------------------------------

def questions(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "response": f"{i} + {i} = {2 * i}\n#### {2 * i}",
             "final_answer": str(2 * i), "level": i % 3} for i in range(n)]


def text_config(tmp_path, **eval_section) -> Config:
    """No reward model anywhere: an SFT-format GSM8K-like dataset feeds phase 3 only (as the GRPO recipe's)."""
    data = write_jsonl(tmp_path / "gsm.jsonl", questions(30))
    return Config.model_validate({
        "run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "tiny-random"},
        "data": {"datasets": [{"name": "d", "path": str(data), "format": "sft", "phases": [3]}],
                 "cache_dir": str(tmp_path / "cache"), "max_seq_len": 96, "max_prompt_len": 48, "eval_fraction": 0.2},
        "eval": {"policy": "tiny-random", "baseline": "tiny-random", "max_prompts": 6, "batch_size": 3,
                 "sampling": {"max_new_tokens": 8}, **eval_section}})


def generations(cfg: Config) -> list[dict]:
    return [json.loads(line) for line in (cfg.output_dir / "eval" / "generations.jsonl").read_text().splitlines()]


def test_eval_judges_by_text_rewards_alone_with_the_prompt_files_metadata(tmp_path):
    """No RM: eval.rewards judge. Every mean, paired gain and length equals what the written generations and
    the prompt file's own fields give; a python source sees each record's metadata."""
    from rlhfkit.eval.compare import run_eval
    from rlhfkit.rewards.verifiers import gsm8k_reward

    (tmp_path / "by_level.py").write_text(
        "def score(prompts, responses, metadata):\n"
        "    return [m['level'] * 10 + len(r) for r, m in zip(responses, metadata)]\n")
    records = [{"id": f"t{i}", "prompt": f"Add {i} and {i + 1}.", "final_answer": str(2 * i + 1), "level": i % 4}
               for i in range(5)]
    test_file = write_jsonl(tmp_path / "sums.jsonl", records)
    cfg = text_config(tmp_path, prompt_sets=["phase3", str(test_file)], rewards=[
        {"type": "gsm8k", "name": "accuracy"}, {"type": "regex", "pattern": "[aeiou]", "name": "vowel"},
        {"type": "python", "function": f"{tmp_path / 'by_level.py'}:score", "name": "by_level"}])
    results = run_eval(cfg, show_progress=False)
    assert results["reward_model"] is None and results["rm_accuracy"] is None
    assert results["judges"] == ["accuracy", "vowel", "by_level"]
    assert [t["metric"] for t in results["text_rewards"]] == ["accuracy", "match rate", "mean reward"]
    gens = generations(cfg)
    assert [g["metadata"] for g in gens if g["set"] == "sums"] == [{"id": r["id"], "final_answer": r["final_answer"],
                                                                    "level": r["level"]} for r in records]
    assert {g["set"] for g in gens} == {"phase3_eval", "sums"}
    for name, s in results["sets"].items():
        rows = [g for g in gens if g["set"] == name]
        assert s["prompts"] == len(rows) > 0 and "rm_gain" not in s
        for side in ("final", "sft"):
            by_hand = {"accuracy": [gsm8k_reward(g[side], g["metadata"]["final_answer"]) for g in rows],
                       "vowel": [float(any(c in "aeiou" for c in g[side])) for g in rows],
                       "by_level": [g["metadata"]["level"] * 10 + len(g[side]) for g in rows]}
            for judge, values in by_hand.items():
                assert s[f"{judge}_{side}_score"] == pytest.approx(np.mean(values))
                assert [g[f"{judge}_{side}"] for g in rows] == pytest.approx(values)
            assert s[f"{side}_length"] == pytest.approx(np.mean([g[f"{side}_length"] for g in rows]))
        for judge in ("accuracy", "vowel", "by_level"):
            diff = [g[f"{judge}_final"] - g[f"{judge}_sft"] for g in rows]
            assert s[f"{judge}_gain"] == pytest.approx(np.mean(diff))  # paired by prompt
            lo, hi = s[f"{judge}_gain_ci"]
            assert lo <= s[f"{judge}_gain"] + 1e-9 and hi >= s[f"{judge}_gain"] - 1e-9
            assert not any(f["flag"] == "reward_hacking_risk" for f in s["flags"])
    text = format_table(results)
    assert "judged by eval.rewards alone" in text and "no rm scores" in text
    assert "sums vowel (match rate): final" in text and "sums accuracy: final" in text
    page = build_report(cfg.output_dir).read_text()
    assert 'id="eval-judges"' in page and "judged by eval.rewards alone" in page


def test_the_gsm8k_source_reads_each_prompts_final_answer_in_eval(tmp_path):
    """The same response is right for one record and wrong for another: the answer comes from the metadata."""
    from rlhfkit.engine.generation import Generation as G

    cfg = text_config(tmp_path, rewards=[{"type": "gsm8k"}, {"type": "format", "name": "format_rate"}])
    cmp = Comparison(cfg)
    tok = cmp.tokenizer
    prompt = tok("Q?", add_special_tokens=False).input_ids
    reply = tok(" so 3 + 4 = 7\n#### 7", add_special_tokens=False).input_ids + [tok.eos_token_id]
    r = to_rollout(G(torch.tensor([prompt, prompt]), torch.tensor([len(prompt)] * 2), torch.tensor([reply, reply]),
                     torch.tensor([len(reply)] * 2), torch.tensor([True, True])), tok.pad_token_id)
    got = cmp.score_parts([r], [{"final_answer": "7"}, {"final_answer": "8"}])
    assert got["gsm8k"].tolist() == [1.0, 0.0] and got["format_rate"].tolist() == [1.0, 1.0]
    assert cmp.judge_names == ["gsm8k", "format_rate"] and cmp.judges == {}


def test_weights_of_eval_rewards_give_a_weighted_sum(tmp_path):
    from rlhfkit.eval.compare import run_eval

    cfg = text_config(tmp_path, rewards=[{"type": "regex", "pattern": "[aeiou]", "name": "vowel", "weight": 0.5},
                                         {"type": "regex", "pattern": "[0-9]", "name": "digit"}])
    results = run_eval(cfg, show_progress=False)
    assert results["judges"] == ["vowel", "digit", "weighted_sum"]
    rows = generations(cfg)
    want = [0.5 * g["vowel_final"] + g["digit_final"] for g in rows]
    assert [g["weighted_sum_final"] for g in rows] == pytest.approx(want)
    assert results["sets"]["phase3_eval"]["weighted_sum_final_score"] == pytest.approx(np.mean(want))
    assert "0.5·vowel + 1·digit" in format_table(results)


def test_eval_without_a_reward_model_or_text_rewards_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="eval.rewards"):
        Comparison(text_config(tmp_path))


def test_a_prompt_file_without_the_field_a_reward_reads_names_the_line(tmp_path):
    from rlhfkit.data.render import Renderer
    from rlhfkit.errors import DataError
    from rlhfkit.eval.compare import prompt_sets

    bad = write_jsonl(tmp_path / "qs.jsonl", [{"prompt": "1+1?", "final_answer": "2"}, {"prompt": "2+2?", "answer": "4"}])
    cfg = text_config(tmp_path, prompt_sets=[str(bad)], rewards=[{"type": "gsm8k"}])
    with pytest.raises(DataError, match=r"qs.jsonl:2: eval.rewards\[0\] \(gsm8k\) reads .*'final_answer'.*\['answer'\]"):
        prompt_sets(cfg, Renderer(_tok(), cfg.data))
    other = write_jsonl(tmp_path / "other" / "qs.jsonl", [{"prompt": "3+3?"}])
    twice = text_config(tmp_path, prompt_sets=[str(bad), str(other)], rewards=[{"type": "regex", "pattern": "x"}])
    with pytest.raises(ConfigError, match="both be reported as the set 'qs'"):
        prompt_sets(twice, Renderer(_tok(), twice.data))


def _tok():
    from rlhfkit.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="tiny-random"))


def test_a_reward_model_and_text_rewards_judge_together(mixed_tokenizers):
    m = mixed_tokenizers
    cmp = Comparison(mixed_config(m, "run", str(m["policy"]), rewards=[{"type": "regex", "pattern": "a"}]))
    assert cmp.judge_names == ["rm", "regex"] and cmp.reward_path == str(m["rm"])


def test_real_gsm8k_test_prompts_carry_their_final_answer(tmp_path):
    from conftest import needs_shared
    from rlhfkit.data.render import Renderer
    from rlhfkit.eval.compare import prompt_sets

    path = needs_shared("data/eval/gsm8k_test.jsonl.gz")
    cfg = text_config(tmp_path, prompt_sets=[str(path)], max_prompts=5, rewards=[{"type": "gsm8k"}])
    rows = prompt_sets(cfg, Renderer(_tok(), cfg.data))["gsm8k_test"]
    assert len(rows) == 5 and all(set(r["metadata"]) == {"id", "reference", "final_answer"} for r in rows)
    assert all(r["metadata"]["reference"].rstrip().endswith(r["metadata"]["final_answer"]) for r in rows)


def test_the_pooled_result_is_a_paired_bootstrap_over_every_prompt_of_every_set():
    """Two sets of 40 prompts whose gains (+0.25 each, noisy) no set shows alone at 95%: pooled over 80
    prompts the gain is the mean of all 80 paired differences, with a narrower interval."""
    import numpy as np

    from rlhfkit.eval.compare import pooled_samples, summarize

    rng = np.random.default_rng(0)

    def one_set(n):
        sft = rng.normal(0.0, 1.0, n)
        return {"final": {"rm": sft + 0.25 + rng.normal(0, 0.6, n)}, "sft": {"rm": sft},
                "final_length": np.full(n, 10.0), "sft_length": np.full(n, 10.0),
                "final_ended": np.ones(n, bool), "sft_ended": np.ones(n, bool), "kl": np.full(n, 0.1)}

    sets = {"a": one_set(40), "b": one_set(40)}
    pooled = summarize(pooled_samples(sets), seed=0)
    gains = np.concatenate([s["final"]["rm"] - s["sft"]["rm"] for s in sets.values()])
    assert pooled["prompts"] == 80 and pooled["rm_gain"] == pytest.approx(gains.mean())
    per_set = [summarize(s, seed=0) for s in sets.values()]
    width = lambda s: s["rm_gain_ci"][1] - s["rm_gain_ci"][0]  # noqa: E731
    assert all(width(pooled) < width(s) for s in per_set)


def test_rm_accuracy_has_a_wilson_interval():
    from rlhfkit.eval.compare import wilson_interval

    lo, hi = wilson_interval(0.6, 300)
    assert lo == pytest.approx(0.5434, abs=1e-3) and hi == pytest.approx(0.6540, abs=1e-3)
    assert wilson_interval(0.5, 0) is None

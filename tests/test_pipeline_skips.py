"""`rlhfkit pipeline` leaves out the stages nothing needs, says why, and records it: RL straight from a model
(no SFT without phase-1 data or with ppo.actor_model; no RM without a model reward, a critic or an RM judge),
and the GGUF export's settings checked before the first stage trains."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_config, write_jsonl
from rlhfkit.config import load_config
from test_pipeline import pipeline_config
from test_training import cli, run_ok, synthetic_pairs


def math_prompts(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "final_answer": str(2 * i)} for i in range(n)]


def grpo_config(tmp_path: Path) -> Path:
    """The GSM8K recipe's shape on the tiny model: prompts only, verifiable rewards, GRPO, the model named once
    (no ppo.actor_model, no eval.baseline)."""
    data = write_jsonl(tmp_path / "math.jsonl", math_prompts(40))
    rewards = [{"type": "gsm8k", "name": "correct"}]
    path = pipeline_config(tmp_path, data, ppo={
        "advantage": "grpo", "n_samples_per_prompt": 2, "rollout_batch_size": 2, "steps": 2, "eval_every": 0,
        "save_every": 0, "eval_prompts": 2, "reward": {"sources": rewards}}, eval={"rewards": rewards},
        export={"gguf": "none"})
    raw = yaml.safe_load(path.read_text())
    del raw["ppo"]["critic"]  # grpo has none
    path.write_text(yaml.safe_dump(raw))
    return path


def test_rl_straight_from_a_model_skips_sft_and_rm_and_starts_from_the_base_model(tmp_path):
    """Old code: SFT ran first and failed (no phase-1 data); the recipe took three commands."""
    out = run_ok(["pipeline", str(grpo_config(tmp_path)), "--no-progress"])
    assert "pipeline: stages data → ppo → eval → export" in out
    assert "pipeline: sft skipped: no dataset feeds phase 1" in out
    assert ("pipeline: rm skipped: nothing reads a reward model trained here: ppo.reward.sources has no `model` "
            "source; advantage grpo has no critic; eval judges by eval.rewards alone") in out
    run = tmp_path / "run"
    assert not (run / "sft").exists() and not (run / "rm").exists()
    record = json.loads((run / "pipeline.json").read_text())
    assert record["stages"] == ["data", "ppo", "eval", "export"] and set(record["skipped"]) == {"sft", "rm"}
    assert list(record["seconds"]) == record["stages"]
    # the actor and eval's baseline are the base model, and the resume fingerprint says so
    assert json.loads((run / "ppo" / "fingerprint.json").read_text())["input actor"].startswith("tiny-random @ ")
    results = json.loads((run / "eval" / "eval.json").read_text())
    assert results["baseline"] == "tiny-random" and results["policy"] == str(run / "ppo" / "final")
    assert "correct" in results["judges"] and results["reward_model"] is None
    assert (run / "export" / "hf" / "model.safetensors").is_file()


def test_actor_model_skips_sft_but_the_rm_runs_for_the_critic_and_the_judge(tmp_path):
    from rlhfkit.config import load_config
    from rlhfkit.pipeline import plan_stages

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20))
    cfg = load_config(pipeline_config(tmp_path, data, ppo={"actor_model": "tiny-random"}))
    stages, skipped = plan_stages(cfg)
    assert stages == ["data", "rm", "ppo", "eval", "export"]
    assert skipped == {"sft": "ppo.actor_model is set: RL starts from tiny-random"}
    # with SFT data and no actor_model, everything runs as before
    assert plan_stages(load_config(pipeline_config(tmp_path, data)))[0] == ["data", "sft", "rm", "ppo", "eval", "export"]


@pytest.mark.parametrize("changes,readers", [
    ({}, ["the RL reward", "the critic", "eval's judge"]),
    ({"ppo": {"reward_model": "some/rm"}}, []),
    ({"ppo": {"critic_model": "some/critic", "reward": {"sources": [{"type": "regex", "pattern": "x"}]}},
      "eval": {"rewards": [{"type": "regex", "pattern": "x"}]}}, []),
    ({"eval": {"reward_model": "some/judge"}}, ["the RL reward", "the critic"]),
    ({"pipeline": {"alignment": "dpo"}}, ["eval's judge"]),
    ({"pipeline": {"alignment": "dpo"}, "eval": {"rewards": [{"type": "regex", "pattern": "x"}]}}, []),
])
def test_the_rm_runs_exactly_when_a_model_of_the_run_reads_it(tmp_path, prefs_file, changes, readers):
    """As ppo and eval locate the RM: a DPO run whose eval judges by the RM gets one (old code: eval failed
    after DPO trained, for want of rm/final)."""
    from rlhfkit.config import Config
    from rlhfkit.pipeline import plan_stages, rm_readers

    raw = {"model": {"name_or_path": "tiny-random"}, "data": {"datasets": [{"name": "p", "path": str(prefs_file)}]}}
    cfg = Config.model_validate({**raw, **changes})
    assert rm_readers(cfg) == readers
    assert ("rm" in plan_stages(cfg)[0]) == bool(readers)


def test_phase_ratios_without_a_phase1_share_skip_sft(tmp_path, prefs_file):
    from rlhfkit.train.starts import actor_source, sft_skip_reason

    cfg = make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}], phase_ratios=[0, 1, 1])
    assert "no dataset feeds phase 1" in sft_skip_reason(cfg) and actor_source(cfg) == "tiny-random"
    sft_only = make_config(tmp_path, [{"name": "p", "path": str(prefs_file), "phases": [1]}], phase_ratios=[0, 1, 1])
    assert sft_skip_reason(sft_only) is None  # a single-phase dataset gives all its records to that phase
    assert actor_source(sft_only) == str(tmp_path / "run" / "sft" / "final")


def test_from_a_skipped_stage_says_why_it_is_not_there(tmp_path):
    p = cli(["pipeline", str(grpo_config(tmp_path)), "--from", "sft"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in out
    assert "--from 'sft': this pipeline's stages are ['data', 'ppo', 'eval', 'export'] (sft is skipped: " in out


def _llama_dir_as(tmp_path: Path, model_type: str, tokenizer_spec: dict | None = None) -> Path:
    """A model directory whose config.json says `model_type` (the weights are never read)."""
    from rlhfkit.models.loading import resolve_model_dir

    src = Path(resolve_model_dir("tiny-random"))
    out = tmp_path / f"model-{model_type}"
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_spec) if tokenizer_spec
                                        else (src / "tokenizer.json").read_text())
    return out


def test_gguf_export_problem_reads_the_architecture_without_loading_the_model(tmp_path, prefs_file):
    from rlhfkit.config import Config
    from rlhfkit.export import gguf_export_problem

    def problem(name_or_path, gguf):
        return gguf_export_problem(Config.model_validate({
            "model": {"name_or_path": str(name_or_path)}, "export": {"gguf": gguf},
            "data": {"datasets": [{"name": "p", "path": str(prefs_file)}]}}))

    opt = _llama_dir_as(tmp_path, "opt")
    message = problem(opt, "q8_0")
    assert message.startswith(f"export.gguf: q8_0 cannot be written for {opt}: GGUF export covers Llama-architecture")
    assert "'opt'" in message and "auto, f16, q8_0, none" in message and "none (or null" in message
    assert problem(opt, "auto") is None and problem(opt, "none") is None
    assert problem(_llama_dir_as(tmp_path, "mistral"), "f16") is None
    assert problem("tiny-random", "q8_0") is None and problem("smollm2-135m-instruct", "f16") is None
    # a SentencePiece-style BPE (Llama 2): written as GPT-2 BPE, llama.cpp would tokenize text differently
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": {"type": "Metaspace"}}
    assert "byte-level BPE" in problem(_llama_dir_as(tmp_path, "llama", spm), "f16")


def refused_before_training(tmp_path: Path, cfg: Path) -> str:
    """`rlhfkit pipeline cfg`'s output, after checking it exited 2 without a traceback and before any stage ran."""
    p = cli(["pipeline", str(cfg), "--no-progress"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in out
    assert not (tmp_path / "run" / "data").exists()  # nothing ran
    return out


def test_the_pipeline_stops_before_training_for_a_gguf_it_cannot_write(tmp_path):
    """Old code: SFT, RM and PPO trained, then the export failed (`q8_0` was the default)."""
    from rlhfkit.config import ExportConfig

    assert ExportConfig().gguf == "auto" and ExportConfig(gguf=None).gguf == "none"
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20))
    model = _llama_dir_as(tmp_path, "gpt_neox")
    cfg = pipeline_config(tmp_path, data, model={"name_or_path": str(model)}, export={"gguf": "q8_0"})
    out = refused_before_training(tmp_path, cfg)
    assert f"rlhfkit: error: export.gguf: q8_0 cannot be written for {model}" in out


def test_a_second_judge_that_is_not_there_stops_the_pipeline_before_training(tmp_path):
    """Old code: every stage trained, then the eval failed loading eval.second_judge."""
    from rlhfkit.config_tools import check_config

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20))
    judge = tmp_path / "judge" / "rm" / "final"
    cfg = pipeline_config(tmp_path, data, eval={"second_judge": str(judge)}, export={"gguf": "none"})
    out = refused_before_training(tmp_path, cfg)
    assert f"rlhfkit: error: eval.second_judge: {judge} not found" in out
    assert [m for m in check_config(load_config(cfg)) if m.startswith("eval.second_judge")]
    # a hub id may be in the cache; it is not a missing local directory
    assert not check_config(load_config(cfg, ["eval.second_judge=OpenAssistant/reward-model"]))


def test_auto_exports_f16_where_it_can_and_says_why_not_elsewhere(tmp_path):
    from rlhfkit.export import gguf_type
    from rlhfkit.models.loading import resolve_model_dir

    assert gguf_type("auto", Path(resolve_model_dir("tiny-random"))) == ("f16", None)
    qtype, why = gguf_type("auto", _llama_dir_as(tmp_path, "qwen2"))
    assert qtype is None and why.startswith("export.gguf auto: GGUF export covers Llama-architecture") and "'qwen2'" in why
    assert gguf_type("q8_0", _llama_dir_as(tmp_path, "phi")) == ("q8_0", None)  # explicit: write_gguf refuses it


def test_the_gsm8k_recipe_is_one_pipeline_command():
    from rlhfkit.config import load_config
    from rlhfkit.pipeline import plan_stages

    recipe = REPO / "configs" / "gsm8k-grpo.yaml"
    cfg = load_config(recipe)
    if not all(Path(d.path).is_file() for d in cfg.data.datasets):
        pytest.skip("the GSM8K data is not in ../shared")
    stages, skipped = plan_stages(cfg)
    assert stages == ["data", "ppo", "eval", "export"] and set(skipped) == {"sft", "rm"}
    assert cfg.ppo.actor_model is None and cfg.eval.baseline is None  # the model is named once
    assert "rlhfkit pipeline configs/gsm8k-grpo.yaml" in recipe.read_text()


def test_dpo_starts_where_the_config_says_not_where_a_leftover_sft_dir_points(tmp_path):
    """Old code: a run without phase-1 data but with an old sft/final in its dir started DPO (and eval's baseline)
    from that leftover model, while the pipeline said it started from model.name_or_path."""
    from rlhfkit.config import load_config
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.starts import dpo_start_model

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20))
    with_sft = load_config(pipeline_config(tmp_path, data))
    with pytest.raises(ConfigError, match=r"DPO needs .*sft/final \(run `rlhfkit sft` first\) or `dpo.model`"):
        dpo_start_model(with_sft)
    leftover = tmp_path / "run" / "sft" / "final"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    assert dpo_start_model(with_sft) == str(leftover)
    without_sft = load_config(pipeline_config(tmp_path, data), ["data.phase_ratios=[0,1,1]"])
    assert dpo_start_model(without_sft) == without_sft.model.name_or_path
    assert dpo_start_model(load_config(pipeline_config(tmp_path, data), ["dpo.model=elsewhere"])) == "elsewhere"

"""`rlhfkit config show|check` and the generated reference docs/config.md."""

from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.config import Config, load_config, section_types
from rlhfkit.config_tools import DOCS_COMMAND, check_config, config_docs, show_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


def test_docs_config_md_is_what_the_schema_generates():
    written = (REPO / "docs" / "config.md").read_text()
    assert written == config_docs(), f"docs/config.md is out of date: run `{DOCS_COMMAND}`"


def every_key(cls=Config, path=""):
    """(dotted key, field) of every key in the schema, through nested sections and list items."""
    for name, field in cls.model_fields.items():
        key = f"{path}.{name}" if path else name
        yield key, field
        for sub in section_types(field.annotation):
            yield from every_key(sub, key)


def test_every_key_has_a_description():
    missing = sorted({key for key, field in every_key() if not field.description})
    assert not missing, f"keys without a description (Field(description=...)): {missing}"


SOURCES = "ppo.reward.sources=[{type: regex, pattern: 'a|b'}, {type: model, weight: 0.5}]"


@pytest.mark.parametrize("recipe, overrides", [(r, []) for r in RECIPES] + [
    ("tiny.yaml", ["ppo.adaptive_kl={target: 3}", SOURCES, "eval.rewards=[{type: gsm8k}]", "model.tiny={}"])])
def test_show_prints_yaml_that_loads_back_to_the_same_config(recipe, overrides, tmp_path):
    cfg = load_config(REPO / "configs" / recipe, overrides)
    for changed in (False, True):
        shown = tmp_path / f"shown_{changed}.yaml"
        shown.write_text(show_config(cfg, changed=changed))
        assert load_config(shown) == cfg, (recipe, changed)


def test_show_has_every_default_and_the_descriptions(capsys):
    assert main(["config", "show", "configs/tiny.yaml", "ppo.kl_mode=off"]) == 0
    out = capsys.readouterr().out
    raw = yaml.safe_load(out)
    assert raw["ppo"]["kl_mode"] == "off" and raw["ppo"]["gamma"] == 1.0 and raw["sft"]["adam_betas"] == [0.9, 0.95]
    assert raw["sft"]["seed"] == raw["run"]["seed"] == 42
    assert "  # responses (not prompts: verl's ppo_mini_batch_size counts prompts) per optimizer step" in out
    assert "# AdamW (β1, β2); note β2 0.95" in out


def test_show_changed_prints_only_what_differs_from_the_defaults(capsys):
    assert main(["config", "show", "configs/quickstart.yaml", "--changed", "ppo.advantage=rloo",
                 "ppo.n_samples_per_prompt=2", "ppo.critic={}"]) == 0
    raw = yaml.safe_load(capsys.readouterr().out)
    assert raw["ppo"]["advantage"] == "rloo" and raw["ppo"]["kl_coef"] == 0.05
    assert "gamma" not in raw["ppo"] and "critic" not in raw["ppo"] and "seed" not in raw["sft"]
    assert raw["sft"]["lora"] == {"r": 16, "alpha": 32.0} and raw["data"]["seed"] == 1234
    assert set(raw) == {"run", "data", "sft", "rm", "dpo", "ppo", "eval", "export", "pipeline"}


def test_check_passes_a_good_config_and_prints_the_batch_arithmetic(capsys):
    assert main(["config", "check", "configs/quickstart.yaml", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "ppo: 4 prompts × 4 = 16 responses per step; 2 updates of 8 responses per epoch (4 per process" in out
    assert "sft: 8 examples × 1 accumulation × 2 processes = 16 per optimizer step" in out and "ok: configs/quickstart.yaml at 2 processes" in out


def test_check_names_each_problem_by_its_key_and_exits_non_zero(capsys, tmp_path):
    code = main(["config", "check", "configs/quickstart.yaml", "--world-size", "3", "ppo.sampling.top_p=0.9",
                 f"data.datasets.1.path={tmp_path / 'gone.jsonl'}", f"eval.prompt_sets=[phase3, {tmp_path / 'p.jsonl'}]",
                 "pipeline.time_budget_minutes=5", "rm.lr_scheduler=cosine"])
    err = capsys.readouterr().err
    assert code != 0 and "at 3 processes: 6 problems" in err, err
    for key in ("ppo.rollout_batch_size (4) must be a multiple of the number of processes (3)",
                "ppo.mini_batch_size (8) must be a multiple of the number of processes (3)", "ppo.sampling.top_p is 0.9",
                "data.datasets.1.path: ", "eval.prompt_sets.1: ", "rm.lr_scheduler 'cosine'"):
        assert key in err, (key, err)


def test_check_at_world_size_one_and_eight():
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert check_config(tiny, 1) == [] and check_config(tiny, 2) == []
    assert check_config(tiny, 8) == [
        "ppo.rollout_batch_size (4) must be a multiple of the number of processes (8)",
        "ppo.mini_batch_size (unset: all 4 responses of a step) must be a multiple of the number of processes (8)"]


def test_check_runs_the_stages_own_checks(tmp_path):
    """The trainer raises the same message when it starts (ppo_world_problems is its check)."""
    from rlhfkit.config import ppo_world_problems

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["ppo.mini_batch_size=2"])
    assert ppo_world_problems(cfg.ppo, 4) == check_config(cfg, 4)
    reward = load_config(REPO / "configs" / "tiny.yaml", [
        "ppo.advantage=grpo", "ppo.n_samples_per_prompt=2", "ppo.critic={}",
        f"ppo.reward.sources=[{{type: python, function: '{tmp_path / 'missing.py'}:f'}}]"])
    problems = check_config(reward, 1)
    assert len(problems) == 1 and problems[0].startswith("ppo.reward.sources[0].function: file ")


def test_check_loads_the_tools_and_the_environment(tmp_path):
    """A tool or environment that would not load is named before the run starts, as a reward function is."""
    tools = tmp_path / "my_tools.py"
    tools.write_text('def ok() -> str:\n    """Fine."""\n    return "ok"\n')
    episodes = ["ppo.advantage=grpo", "ppo.n_samples_per_prompt=2", "ppo.critic={}", "ppo.max_turns=2"]
    bad = load_config(REPO / "configs" / "tiny.yaml", episodes + [f"ppo.tools=[calculator, '{tmp_path / 'gone.py'}:f']",
                                                                  f"ppo.environment='{tools}:Maze'"])
    assert check_config(bad, 1) == [f"ppo.tools[1]: file {tmp_path / 'gone.py'} not found (relative paths start at "
                                    f"{Path.cwd()})", f"ppo.environment: {tools} has no function 'Maze'"]
    good = load_config(REPO / "configs" / "tiny.yaml", episodes + [f"ppo.tools=[calculator, '{tools}:ok']",
                                                                   "ppo.environment=guess_number"])
    assert check_config(good, 1) == []


def test_check_names_a_gguf_type_the_models_architecture_cannot_take(tmp_path):
    """The export stage's check (export.gguf_export_problem), from the model's config.json, before any training."""
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.name_or_path={tmp_path / 'qwen'}", "export.gguf=q8_0"])
    problems = check_config(cfg, 1)
    assert len(problems) == 1 and problems[0].startswith("export.gguf: q8_0 cannot be written") and "qwen2" in problems[0]
    assert check_config(load_config(REPO / "configs" / "tiny.yaml", ["export.gguf=q8_0"]), 1) == []

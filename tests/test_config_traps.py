"""The config traps of issue 20: YAML booleans for `off`, switching the estimator from the command line,
run.seed as every stage's default seed, W&B settings in one place, and unknown keys with a suggestion."""

from pathlib import Path

import pytest
import torch
import yaml

from rlhfkit.config import load_config, save_resolved_config
from rlhfkit.engine import precision as P
from rlhfkit.errors import ConfigError
from rlhfkit.tracking import wandb_init_args

from conftest import write_jsonl, pref_records

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def write(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_cfg(tmp_path):
    """A tiny-random recipe with a real data file, runs under tmp_path."""
    data = write_jsonl(tmp_path / "prefs.jsonl", pref_records(40))
    return write(tmp_path, {"run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "tiny-random"},
                            "data": {"datasets": [{"name": "d", "path": str(data)}], "cache_dir": str(tmp_path / "cache"),
                                     "max_seq_len": 128, "max_prompt_len": 64},
                            "ppo": {"critic": {"learning_rate": 1e-4}}})


# --- YAML 1.1 booleans ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["ppo.kl_mode=off", "ppo.kl_mode=Off", "ppo.kl_mode=false"])
def test_kl_mode_off_on_the_command_line(tmp_path, tiny_cfg, override):
    """PyYAML reads `off` as False: the override failed with "Input should be 'reward', 'loss' or 'off' (got False)"."""
    assert load_config(tiny_cfg, [override]).ppo.kl_mode == "off"


def test_kl_mode_off_in_the_file(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("data:\n  datasets: [{name: d, path: x.jsonl}]\nppo:\n  kl_mode: off\n")
    assert load_config(path).ppo.kl_mode == "off"


def test_a_boolean_for_a_choice_without_that_word_is_still_an_error(tiny_cfg):
    with pytest.raises(ConfigError, match=r"sft.resume: Input should be 'auto', 'never' or 'force' \(got False\)"):
        load_config(tiny_cfg, ["sft.resume=off"])


# --- switching the estimator from the command line -------------------------------------------------------

def ppo_quickstart(tmp_path):
    """The quickstart as a PPO recipe with its critic section (the quickstart itself runs RLOO)."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["ppo"].update(advantage="gae", n_samples_per_prompt=1, rollout_batch_size=8,
                      critic={"learning_rate": 3e-4, "lora": {"r": 16, "alpha": 32}})
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_switching_a_ppo_recipe_to_grpo_on_the_command_line_warns_once_about_the_critic(capsys, tmp_path):
    """It failed with "critic is set, but only advantage gae reads it" until the user also passed ppo.critic={}."""
    cfg = load_config(ppo_quickstart(tmp_path), ["ppo.advantage=grpo", "ppo.n_samples_per_prompt=4",
                                                 "ppo.rollout_batch_size=2"])
    assert cfg.ppo.advantage == "grpo" and not cfg.ppo.uses_critic
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "ppo.critic not used" in warnings[0] and "advantage grpo has no critic" in warnings[0]


def test_kl_settings_under_kl_mode_off_are_named_in_the_warning(capsys, tmp_path):
    cfg = load_config(ppo_quickstart(tmp_path), ["ppo.kl_mode=off", "ppo.advantage=rloo", "ppo.n_samples_per_prompt=2",
                                                 "ppo.lam=0.9"])
    assert cfg.ppo.kl_mode == "off"
    err = capsys.readouterr().err
    assert "ppo.critic, ppo.lam, ppo.kl_coef not used" in err and "kl_mode is off" in err


def test_the_resolved_config_of_the_quickstart_warns_about_nothing(capsys, tmp_path):
    cfg = load_config(QUICKSTART)
    load_config(save_resolved_config(cfg, tmp_path))
    assert "warning" not in capsys.readouterr().err


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with native bf16 (where `auto` says why a model trains in fp32), no GPU."""
    monkeypatch.delenv(P.FORCE_FP32_ENV, raising=False)
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(P, "cpu_bf16_speedup", lambda: 2.3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(P, "_why_stage", {})


def test_a_critic_free_run_says_nothing_about_a_critic(tiny_cfg, bf16_cpu, capsys):
    """`ppo.advantage=rloo ppo.critic={}` printed "ppo.critic: float32, not bfloat16 ..." though no critic is built."""
    from rlhfkit.train.common import begin_stage

    cfg = load_config(tiny_cfg, ["ppo.advantage=rloo", "ppo.n_samples_per_prompt=2", "ppo.critic={}",
                                 "ppo.actor.learning_rate=1e-5", "ppo.actor_model=tiny-random"])
    begin_stage(cfg, cfg.output_dir / "ppo", "ppo")
    out = capsys.readouterr().out
    assert "ppo.actor: float32, not bfloat16" in out and "critic" not in out


# --- run.seed -----------------------------------------------------------------------------------------------

SEEDS = ("data", "sft", "rm", "dpo", "ppo", "eval")


def test_run_seed_is_every_stage_seed_unless_the_stage_sets_its_own(tiny_cfg, tmp_path):
    """run.seed seeded nothing: only the resume fingerprint read it."""
    default = load_config(tiny_cfg)
    other = load_config(tiny_cfg, ["run.seed=7"])
    for name in SEEDS:
        assert getattr(default, name).seed == 42 and getattr(other, name).seed == 7, name
    own = load_config(tiny_cfg, ["run.seed=7", "sft.seed=3", "data.seed=5"])
    assert (own.sft.seed, own.data.seed, own.rm.seed, own.ppo.seed) == (3, 5, 7, 7)
    again = load_config(save_resolved_config(own, tmp_path), ["run.seed=9"])  # a resolved config sets them all
    assert (again.sft.seed, again.data.seed, again.ppo.seed) == (3, 5, 7)


def test_the_rl_stage_starts_from_its_seed(tiny_cfg):
    """PPO's models were built under ppo.actor.seed, a fixed 42 the config may not change."""
    from rlhfkit.train.common import begin_stage

    cfg = load_config(tiny_cfg, ["run.seed=7", "ppo.actor_model=tiny-random"])
    begin_stage(cfg, cfg.output_dir / "ppo", "ppo")
    assert torch.initial_seed() == 7


def test_a_different_run_seed_gives_a_different_split(tiny_cfg):
    from rlhfkit.data.prepare import load_phase, prepare

    def sft_rows(seed):
        cfg = load_config(tiny_cfg, [f"run.seed={seed}", f"run.output_dir={tiny_cfg.parent / f'run{seed}'}"])
        prepare(cfg, show_progress=False)
        (_, table), = load_phase(cfg.output_dir / "data", 1, "train")
        return [tuple(table.row(i)["input_ids"]) for i in range(len(table))]

    assert sorted(sft_rows(1)) != sorted(sft_rows(2))


# --- W&B ----------------------------------------------------------------------------------------------------

def test_wandb_settings_live_in_one_section_and_runs_say_which_run_they_are(tiny_cfg):
    cfg = load_config(tiny_cfg, ["wandb.project=rlhf", "run.output_dir=runs/grpo-lr3e-6"])
    args = wandb_init_args(cfg.model_dump(mode="json"), "ppo")
    assert (args["project"], args["name"], args["group"], args["entity"]) == ("rlhf", "grpo-lr3e-6/ppo", "grpo-lr3e-6", None)
    cfg = load_config(tiny_cfg, ["wandb.project=rlhf", "wandb.entity=team", "wandb.group=sweep", "wandb.name=try1"])
    args = wandb_init_args(cfg.model_dump(mode="json"), "sft")
    assert (args["entity"], args["group"], args["name"]) == ("team", "sweep", "try1/sft")
    assert wandb_init_args(load_config(tiny_cfg).model_dump(mode="json"), "sft") is None


def test_the_old_per_stage_wandb_key_points_to_the_new_one(tiny_cfg):
    with pytest.raises(ConfigError, match=r"ppo.wandb_project: unknown key; did you mean `wandb.project`\?"):
        load_config(tiny_cfg, ["ppo.wandb_project=x"])


# --- unknown keys -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, suggestion", [
    ("sft.lr=1e-5", "sft.learning_rate"),
    ("sft.learnig_rate=1e-5", "sft.learning_rate"),
    ("ppo.actor.lr=1e-6", "ppo.actor.learning_rate"),
    ("ppo.num_generations=4", "ppo.n_samples_per_prompt"),
    ("ppo.max_new_tokens=32", "ppo.sampling.max_new_tokens"),
    ("data.datasets.0.fromat=sft", "data.datasets.0.format"),
    ("sfft.epochs=2", "sft"),
])
def test_an_unknown_key_suggests_the_nearest_valid_one(tiny_cfg, override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_cfg, [override])
    assert f"unknown key; did you mean `{suggestion}`?" in str(err.value), str(err.value)


def test_an_unknown_key_in_the_file_and_in_a_reward_source(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  datasets: [{name: d, path: x.jsonl}]\nppo:\n  reward:\n    sources:\n"
                    "      - {type: python, function: 'f.py:g', wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"ppo.reward.sources.0.python.wieght: unknown key; did you mean "
                                          r"`ppo.reward.sources.0.weight`\?"):
        load_config(path)


def test_nothing_near_says_where_the_keys_are(tiny_cfg):
    with pytest.raises(ConfigError, match=r"ppo.xyzzy: unknown key \(check the spelling; `rlhfkit config show"):
        load_config(tiny_cfg, ["ppo.xyzzy=1"])

"""The one-node GPU recipes pass `rlhfkit config check --world-size 8`: their batch sizes split over 8
processes, their files exist, their export suits the model. The check must not need the Hub (offline here)."""

import os
import subprocess

import pytest

from conftest import REPO, SHARED

RLHFKIT = REPO / ".venv" / "bin" / "rlhfkit"
RECIPES = ["configs/gpu/grpo-gsm8k-qwen2.5-1.5b.yaml", "configs/gpu/ppo-hh-qwen2.5-1.5b.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_passes_config_check_on_8_processes(recipe):
    if not SHARED.is_dir():
        pytest.skip(f"the recipes read data and eval prompts from {SHARED}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RLHFKIT_SHARED": str(SHARED)}
    done = subprocess.run([str(RLHFKIT), "config", "check", recipe, "--world-size", "8"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"config check {recipe} --world-size 8 exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_fails_config_check_where_its_batches_do_not_split(recipe):
    """The check above means something: at 7 processes a step's 64 or 128 prompts do not divide."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RLHFKIT_SHARED": str(SHARED)}
    done = subprocess.run([str(RLHFKIT), "config", "check", recipe, "--world-size", "7"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ppo.rollout_batch_size" in done.stdout + done.stderr

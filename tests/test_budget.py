"""Time-budgeted pipelines: steps planned from measured times, recorded, and replayed exactly."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config, write_jsonl
from rlhfkit.errors import ConfigError
from rlhfkit.train.budget import StageBudget, StepPlanner
from test_training import synthetic_pairs


def test_planner_fits_steps_evals_and_checkpoints_in_the_budget(tmp_path):
    plan_file = tmp_path / "plan.json"
    planner = StepPlanner(StageBudget(seconds=100.0, started=time.perf_counter()), "sft", total=20, eval_every=0,
                          save_every=0, plan_file=plan_file, resumed=False)
    planner.timed_eval(5.0)
    assert planner.after_step(1, 30.0) == 20  # the warm-up step plans nothing
    # step 10 s; left ≈ 100 s − ε; after step n: (n − 2)·10 + final eval 5 + final checkpoint (guessed 2 steps)
    assert planner.after_step(2, 10.0) == 9
    assert json.loads(plan_file.read_text())["planned"] == 9
    planner.timed_save(1.0)  # a checkpoint took 1 s, not the 20 s guessed: the plan grows again
    assert planner.after_step(3, 10.0) == 12  # (n − 3)·10 + 5 + 1 ≤ 100
    assert json.loads(plan_file.read_text())["planned"] == 12


def test_planner_counts_the_evals_and_checkpoints_the_remaining_steps_bring(tmp_path):
    planner = StepPlanner(StageBudget(seconds=100.0, started=time.perf_counter()), "rm", total=50, eval_every=2,
                          save_every=4, plan_file=tmp_path / "plan.json", resumed=False)
    planner.timed_eval(4.0)
    planner.timed_save(6.0)
    planner.after_step(1, 1.0)
    # after step n: (n − 2)·5 + evals at 4, 6 … below n, + saves at 4, 8 … below n, + final eval and save
    n = planner.after_step(2, 5.0)
    cost = lambda n: (n - 2) * 5 + 4 * (len(range(4, n, 2)) + 1) + 6 * (len(range(4, n, 4)) + 1)  # noqa: E731
    assert cost(n) <= 100 < cost(n + 1)


def test_a_resumed_stage_keeps_its_recorded_plan(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"planned": 7, "configured": 20}))
    planner = StepPlanner(StageBudget(seconds=1.0, started=time.perf_counter()), "sft", 20, 0, 0,
                          tmp_path / "plan.json", resumed=True)
    assert planner.total == 7 and planner.after_step(3, 100.0) == 7


def test_a_schedule_that_depends_on_the_step_count_is_refused_under_a_budget(tmp_path):
    from rlhfkit.pipeline import run_pipeline

    cfg = make_config(tmp_path, [{"name": "d", "path": "x.jsonl"}])
    cfg.pipeline.time_budget_minutes = 10
    with pytest.raises(ConfigError, match="sft.lr_scheduler 'cosine' depends on that number"):
        run_pipeline(cfg, show_progress=False)


def test_a_budgeted_stage_replays_exactly_with_its_planned_steps(tmp_path):
    """SFT under a budget too small for its 400 configured steps plans fewer; the same config with
    max_steps = the plan and no budget reaches bit-identical weights."""
    from rlhfkit.train.sft import run_sft

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))

    def config(name, **sft):
        cfg = make_config(tmp_path / name, [{"name": "d", "path": str(data)}])
        cfg.sft = cfg.sft.model_copy(update={"micro_batch_size": 4, "learning_rate": 1e-3, "save_every": 0,
                                             "lr_scheduler": "constant_with_warmup", "warmup_steps": 2, **sft})
        return cfg

    budgeted = config("a", max_steps=400)
    run_sft(budgeted, show_progress=False, budget=StageBudget(seconds=2.0, started=time.perf_counter()))
    plan = json.loads((tmp_path / "a" / "run" / "sft" / "plan.json").read_text())
    assert 2 <= plan["planned"] < 400 and plan["configured"] == 400
    run_sft(config("b", max_steps=plan["planned"]), show_progress=False)
    a = load_file(tmp_path / "a" / "run" / "sft" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "sft" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

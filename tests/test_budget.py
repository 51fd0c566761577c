"""Time-budgeted pipelines: steps planned from measured times, recorded, and replayed exactly."""

import json
import statistics
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


def test_without_a_timed_eval_the_final_eval_is_planned_from_its_guess(tmp_path):
    """A stage that skips the eval before its first step (rm.eval_at_start: false) still keeps time for the
    final one: eval_guess_steps steps' worth until an eval is timed."""
    planner = StepPlanner(StageBudget(seconds=100.0, started=time.perf_counter()), "rm", total=50, eval_every=0,
                          save_every=0, plan_file=tmp_path / "plan.json", resumed=False, save_guess_steps=1.0,
                          eval_guess_steps=3.0)
    planner.after_step(1, 10.0)
    assert planner.after_step(2, 10.0) == 7  # (n − 2)·10 + eval 3·10 + checkpoint 1·10 ≤ 100


def test_an_earlier_stages_timed_checkpoint_is_the_guess_until_this_stage_times_one(tmp_path):
    """In the pipeline a stage's budget carries the longest checkpoint an earlier stage timed: a guess in
    steps would keep 2 slow RL steps (~60 s on a CPU) for a ~4 s checkpoint."""
    planner = StepPlanner(StageBudget(seconds=100.0, started=time.perf_counter(), checkpoint_s=1.0), "ppo",
                          total=50, eval_every=0, save_every=0, plan_file=tmp_path / "plan.json", resumed=False)
    planner.timed_eval(5.0)
    planner.after_step(1, 30.0)
    assert planner.after_step(2, 10.0) == 11  # (n − 2)·10 + eval 5 + checkpoint 1 ≤ 100, not 2·10
    planner.timed_final_save(1.5)
    planner.write()
    r = json.loads((tmp_path / "plan.json").read_text())
    assert r["checkpoint_guess_s"] == 1.0 and r["final_checkpoint_s"] == 1.5 and r["checkpoints_timed"] == 0


def test_the_plan_can_be_recomputed_from_its_record_alone(tmp_path):
    """plan.json keeps every figure the planner used: replaying _cost on them gives the recorded plan."""
    plan_file = tmp_path / "plan.json"
    planner = StepPlanner(StageBudget(seconds=60.0, started=time.perf_counter(), checkpoint_s=3.0), "rm", total=40,
                          eval_every=5, save_every=7, plan_file=plan_file, resumed=False, eval_guess_steps=2.0)
    for done, took in enumerate([3.0, 1.0, 1.2, 0.9, 1.1], start=1):
        planner.after_step(done, took)
    r = json.loads(plan_file.read_text())
    step_s = statistics.median(r["step_times_s"][r["warmup_steps"]:])
    eval_s = r["eval_s"] if r["evals_timed"] else r["eval_guess_steps"] * step_s
    guess = r["checkpoint_guess_s"] if r["checkpoint_guess_s"] is not None else r["checkpoint_guess_steps"] * step_s
    save_s = r["checkpoint_s"] if r["checkpoints_timed"] else guess
    done = len(r["step_times_s"])

    def cost(n):
        between = range(done + 1, n)
        evals = sum(1 for s in between if s % r["eval_every"] == 0)
        saves = sum(1 for s in between if s % r["save_every"] == 0)
        return (n - done) * step_s + (evals + 1) * eval_s + (saves + 1) * save_s

    assert cost(r["planned"]) <= r["left_s"] < cost(r["planned"] + 1)


def test_a_resumed_stage_keeps_its_recorded_plan(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"planned": 7, "configured": 20}))
    planner = StepPlanner(StageBudget(seconds=1.0, started=time.perf_counter()), "sft", 20, 0, 0,
                          tmp_path / "plan.json", resumed=True)
    assert planner.total == 7 and planner.after_step(3, 100.0) == 7


def test_a_schedule_that_depends_on_the_step_count_is_refused_under_a_budget(tmp_path):
    from rlhfkit.pipeline import run_pipeline

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8))  # the pipeline reads it to plan its stages
    cfg = make_config(tmp_path, [{"name": "d", "path": str(data)}])
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


RESUMED_PLAN_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
from rlhfkit.engine import distributed as D
from rlhfkit.train.budget import StageBudget, StepPlanner

rank, world = D.init_distributed()
own = Path(sys.argv[1]) / f"node{rank}" / "sft"  # each rank's own disk: plan.json is on rank 0's only
own.mkdir(parents=True)
if rank == 0:
    (own / "plan.json").write_text(json.dumps({"planned": 7, "configured": 20}))
planner = StepPlanner(StageBudget(seconds=1.0, started=time.perf_counter()), "sft", 20, 0, 0, own / "plan.json",
                      resumed=True)
totals = [planner.total] + [planner.after_step(step, 0.5) for step in (4, 5, 6)]
(Path(sys.argv[1]) / f"result{rank}.json").write_text(json.dumps(totals))
D.barrier()
os._exit(0)
"""


def test_a_resumed_budgeted_stage_keeps_rank_0s_plan_on_every_rank_without_a_shared_disk(tmp_path):
    """Rank 1 had no plan.json on its disk, kept its budget and waited in the plan's all_reduce (which rank 0,
    finishing its recorded plan, never joined) until the process-group timeout."""
    import subprocess
    import sys

    from conftest import REPO
    from test_training import ENV, _free_port

    script = tmp_path / "plan.py"
    script.write_text(RESUMED_PLAN_SCRIPT)
    try:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(_free_port()), str(script), str(tmp_path)], env={**ENV, "RLHFKIT_DIST_TIMEOUT": "30"},
                           cwd=REPO, capture_output=True, text=True, timeout=120, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed planner hung")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)] == [[7, 7, 7, 7]] * 2
    assert (tmp_path / "node0" / "sft" / "plan.json").is_file() and not (tmp_path / "node1" / "sft" / "plan.json").exists()

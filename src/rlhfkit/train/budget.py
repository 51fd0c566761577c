"""How many steps of a stage fit in its time budget, from the step, eval and checkpoint times it measures.

The pipeline gives each training stage a share of `pipeline.time_budget_minutes`. The stage trains with
its configured number of steps as the upper bound; after a warm-up step it knows what a step costs here,
and after every step it re-plans: the largest number of steps whose remaining steps, the evals and
checkpoints they bring, and the final eval and checkpoint end before the stage's deadline (step times
settle over the first steps, so an early plan may grow again). The plan is written to <stage>/plan.json
and printed when it changes: the same config with `max_steps` (`ppo.steps`) set to the planned number
replays the run exactly on another machine, because a budgeted stage must use a learning-rate schedule
that does not depend on the total number of steps.
A resumed stage keeps the plan it recorded.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import distributed as D
from ..errors import ConfigError
from ..paths import write_text_atomic

WARMUP_STEPS = 1  # the first step (allocations, kernel selection) is not a step time


@dataclass
class StageBudget:
    seconds: float  # wall time the stage may use from `started` (its start, model loading included)
    started: float  # time.perf_counter() when the stage began
    # the longest checkpoint an earlier stage of the pipeline timed: this stage's guess until it times its own
    # (a guess in steps overstates it where steps are slow: 2 RL steps are ~60 s, a LoRA checkpoint ~4 s)
    checkpoint_s: float | None = None


class StepPlanner:
    def __init__(self, budget: StageBudget | None, name: str, total: int, eval_every: int, save_every: int,
                 plan_file: Path, resumed: bool, save_guess_steps: float = 2.0, eval_guess_steps: float = 0.0):
        self.budget, self.name, self.total = budget, name, total
        self.configured = total
        self.eval_every, self.save_every = eval_every, save_every
        self.plan_file = Path(plan_file)
        self.step_times: list[float] = []
        self.eval_s = self.save_s = 0.0
        self.saves_seen = 0
        self.final_save_s: float | None = None  # after the plan: the guess for a later stage's checkpoints
        self.save_guess_steps = save_guess_steps  # a checkpoint's cost in steps, until one was timed
        self.eval_guess_steps = eval_guess_steps  # an eval's cost in steps, until one was timed (none at the start)
        self.evals_seen = 0
        self.left_s: float | None = None  # the time left when the plan was last made
        self.planned_once = False
        # Rank 0's plan.json decides for every rank: without a shared disk only rank 0's disk has it, and a rank
        # that kept its budget while the others dropped theirs would wait in after_step's all_reduce forever.
        recorded = None
        if budget is not None and resumed:
            recorded = D.broadcast_object(self._recorded_plan() if D.is_main() else None)
        if recorded is not None:  # it finishes its recorded plan
            self.total = recorded
            self.budget = None
        elif budget is not None and D.is_main():
            self.plan_file.unlink(missing_ok=True)

    def _recorded_plan(self) -> int | None:
        """The planned number of steps in plan.json, or None when there is none (or it cannot be read)."""
        try:
            return int(json.loads(self.plan_file.read_text())["planned"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"{self.name}: warning: {self.plan_file} cannot be read ({e}); planning the steps again",
                  flush=True)
            return None

    def timed_eval(self, seconds: float) -> None:
        self.eval_s = max(self.eval_s, seconds)
        self.evals_seen += 1

    def timed_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)
        self.saves_seen += 1

    def timed_final_save(self, seconds: float) -> None:
        self.final_save_s = seconds

    def after_step(self, done: int, seconds: float) -> int:
        """Record a step's time; returns the planned number of steps."""
        self.step_times.append(seconds)
        if self.budget is None or len(self.step_times) <= WARMUP_STEPS:
            return self.total
        step_s = statistics.median(self.step_times[WARMUP_STEPS:])
        save_s = self.save_s if self.saves_seen else self._save_guess(step_s)
        eval_s = self.eval_s if self.evals_seen else self.eval_guess_steps * step_s
        left = self.left_s = self.budget.seconds - (time.perf_counter() - self.budget.started)
        planned = self.configured
        while planned > done and self._cost(done, planned, step_s, save_s, eval_s) > left:
            planned -= 1
        planned = D.all_reduce_min(planned)  # every process stops after the same step
        if planned != self.total or not self.planned_once:
            self.total, self.planned_once = planned, True
            if not D.is_main():
                return self.total
            tqdm.write(f"{self.name}: time budget {self.budget.seconds:.0f}s → {planned} of {self.configured} steps "
                       f"(step {step_s:.2f}s, eval {eval_s:.1f}s, checkpoint {save_s:.1f}s)")  # above the bar
            self.write()
        return self.total

    def _save_guess(self, step_s: float) -> float:
        earlier = self.budget.checkpoint_s
        return earlier if earlier is not None else self.save_guess_steps * step_s

    def _cost(self, done: int, n: int, step_s: float, save_s: float, eval_s: float) -> float:
        """Seconds from now to the end of the stage if it stops after step n."""
        between = range(done + 1, n)
        evals = sum(1 for s in between if self.eval_every and s % self.eval_every == 0)
        saves = sum(1 for s in between if self.save_every and s % self.save_every == 0)
        return (n - done) * step_s + (evals + 1) * eval_s + (saves + 1) * save_s

    def write(self) -> None:
        """plan.json: what was planned and every figure it was planned from (rewritten when the plan changes):
        the step times, the timed eval and checkpoint (or the guesses used before one was timed) and the time
        that was left, so that the plan can be recomputed from the record alone."""
        if self.budget is None or not D.is_main():
            return  # no budget, or resumed: the recorded plan stands
        times = self.step_times[WARMUP_STEPS:] or self.step_times
        write_text_atomic(self.plan_file, json.dumps({
            "unit": "steps", "budget_s": self.budget.seconds, "configured": self.configured, "planned": self.total,
            "median_step_s": statistics.median(times) if times else None, "eval_s": self.eval_s,
            "checkpoint_s": self.save_s, "step_times_s": self.step_times, "warmup_steps": WARMUP_STEPS,
            "evals_timed": self.evals_seen, "eval_guess_steps": self.eval_guess_steps,
            "checkpoints_timed": self.saves_seen, "checkpoint_guess_steps": self.save_guess_steps,
            "checkpoint_guess_s": self.budget.checkpoint_s, "final_checkpoint_s": self.final_save_s,
            "eval_every": self.eval_every, "save_every": self.save_every, "left_s": self.left_s}, indent=1))


def check_budgetable(stage: str, lr_scheduler: str, warmup_ratio: float) -> None:
    """A planned stage must replay exactly with max_steps set to its plan: its schedule may not depend on
    the total number of steps."""
    if lr_scheduler not in ("constant", "constant_with_warmup") or warmup_ratio:
        raise ConfigError(
            f"pipeline.time_budget_minutes plans {stage}'s number of steps while it trains, but "
            f"{stage}.lr_scheduler {lr_scheduler!r}" + (" with warmup_ratio" if warmup_ratio else "") +
            " depends on that number: use lr_scheduler constant or constant_with_warmup with warmup_steps, "
            "or drop the time budget")

"""The training loop every supervised stage (SFT, RM, DPO) shares: schedule, micro-batches, eval,
checkpoints, exact resume, metrics. A stage supplies a `Stage`: its data, collate, loss and export."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..engine import distributed as D
from ..engine.backend import TrainEngine, begin_checkpoint, finish_checkpoint, latest_checkpoint, seed_everything
from ..engine.sharding import equal_count_batches
from ..paths import link_or_copy, make_temp_dir, publish_dir
from ..timing import clock, linear_params, train_flops_per_token
from ..tracking import Tracker
from .batching import Blend, StepSchedule, rank_micro_batches
from .budget import StageBudget, StepPlanner
from .guards import NonFiniteGuard
from .update_probe import UpdateProbe


@dataclass
class Stage:
    name: str
    train: Blend
    eval: Blend
    collate: Callable[[list[dict]], dict]
    units: Callable[[list[dict]], int]  # what the loss averages over: target tokens, pairs …
    # (engine, batch) -> (summed loss over the batch's units, {metric: summed value})
    loss: Callable[[TrainEngine, dict], tuple[torch.Tensor, dict]]
    # (engine, out_dir): write the model in its final, loadable form (all ranks call it; rank 0 writes)
    export: Callable[[TrainEngine, Path], None]
    # metrics computed at eval time from the summed metrics: {name: fn(sums) -> value}
    eval_metrics: Callable[[dict], dict] | None = None
    tokens: Callable[[list[dict]], int] = lambda rows: 0
    checkpoint_cost_steps: float = 2.0  # a time budget's guess of a checkpoint's cost until one is timed


def run_stage(stage: Stage, t: TrainConfig, model: torch.nn.Module, param_groups: list[dict], out_dir: Path,
              show_progress: bool = True, config_dump: dict | None = None, budget: StageBudget | None = None) -> dict:
    """Train, evaluating before/during/after, checkpointing and resuming. Returns the final eval metrics.
    With a budget, the number of steps is planned from measured times (train/budget.py)."""
    out_dir = Path(out_dir)
    rank, world = D.init_distributed()
    seed_everything(t.seed)  # the same RNG state at step 0 however much randomness building the model used
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world
    schedule = StepSchedule(len(stage.train), global_batch, t.seed, t.epochs, t.max_steps)
    engine = TrainEngine(model, t, schedule.total_steps, param_groups)

    start = 0
    ckpt = latest_checkpoint(out_dir) if t.resume != "never" else None
    if ckpt:
        state = engine.load_state(ckpt)
        start = int(state["step"])
    if D.is_main():  # metrics past the resumed step (or all, on a fresh start) are redone
        truncate_metrics(out_dir / "metrics.jsonl", start if ckpt else -1)
    planner = StepPlanner(budget, stage.name, schedule.total_steps, t.eval_every, t.save_every,
                          out_dir / "plan.json", resumed=bool(ckpt), save_guess_steps=stage.checkpoint_cost_steps,
                          eval_guess_steps=eval_cost_steps(stage, t, world, engine.module))
    total = planner.total
    tracker = Tracker(out_dir, total, start, desc=stage.name, enabled=D.is_main(), show_progress=show_progress,
                      config=config_dump)
    if ckpt:
        tracker.write(f"{stage.name}: resumed from {ckpt} at step {start}/{total}")

    guard = NonFiniteGuard(stage.name, out_dir, t.max_nonfinite_steps)
    stage_clock = clock()
    stage_clock.add("load", time.perf_counter() - stage_clock.started)  # data, model, engine, resume state
    stage_clock.dtype = engine.cfg.dtype
    flops_per_token = train_flops_per_token(engine.module)
    probe = UpdateProbe(stage.name, engine.module, engine.cfg.dtype)
    if start == 0 and t.eval_at_start:
        tracker.log(0, timed(evaluate, planner.timed_eval, "eval")(stage, engine, t))
    step = start
    while step < total:
        t0 = time.perf_counter()
        engine.train()
        probe.before()
        rows_idx = schedule.rows_for_step(step)
        all_rows = [stage.train.row(int(i)) for i in rows_idx]
        n_units = stage.units(all_rows)
        sums: Counter = Counter()
        for mb in rank_micro_batches(rows_idx, rank, world, t.micro_batch_size):
            rows = [stage.train.row(int(i)) for i in mb]
            loss_sum, metrics = stage.loss(engine, stage.collate(rows))
            engine.backward(loss_sum / n_units)
            sums.update({"loss": loss_sum.item(), **metrics})
        keys = sorted(sums)
        totals = dict(zip(keys, D.all_reduce_sum([float(sums[k]) for k in keys])))
        took = time.perf_counter() - t0
        stage_clock.add("train_steps", took)
        stage_clock.train_flops += flops_per_token * stage.tokens(all_rows) / world  # this process's share
        done = step = step + 1
        total = planner.after_step(done, took)
        tracker.set_total(total)
        logged = {"train/loss": totals.pop("loss") / n_units, "train/lr": engine.lr,
                  "train/grad_norm": engine.grad_norm(), "train/step_time_s": took,
                  "train/tokens_per_s": stage.tokens(all_rows) / took, **probe.after(done, tracker.write)}
        logged.update({f"train/{k}": v / n_units for k, v in totals.items()})
        finite = all(v is None or math.isfinite(v) for v in logged.values())
        tracker.log(done, logged if done % t.log_every == 0 or done == total or not finite else {}, advance=True)
        guard.check(done, {k: logged[k] for k in ("train/loss", "train/grad_norm")})
        if t.eval_every and done % t.eval_every == 0 and done < total:
            tracker.log(done, timed(evaluate, planner.timed_eval, "eval")(stage, engine, t))
        if t.save_every and done % t.save_every == 0 and done < total:
            timed(save_checkpoint, planner.timed_save, "checkpoint")(engine, stage, out_dir, done, t.keep_checkpoints)

    with stage_clock.part("eval"):
        final = evaluate(stage, engine, t)
    tracker.log(total, final)
    with stage_clock.part("checkpoint"):
        ckpt = timed(save_checkpoint, planner.timed_final_save)(engine, stage, out_dir, total, t.keep_checkpoints)
        planner.write()
        if D.is_main():
            publish_final(ckpt / "model", out_dir / "final", final)
        D.copy_dir_to_every_disk(out_dir / "final")  # the next stage reads it on every node
    finish_timing(out_dir, probe)  # before the barrier: the peak is measured while the other ranks wait
    D.barrier()
    tracker.close()
    return final


def eval_cost_steps(stage: Stage, t: TrainConfig, world: int, model: torch.nn.Module) -> float:
    """A guess of one eval's cost in training steps, until one is timed: a forward pass over the eval rows, a
    third of a step per global batch of them where every layer carries gradients (measured for LoRA and full
    fine-tuning alike), more where frozen lower layers shorten the backward pass (by its FLOPs)."""
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world
    cap = None if t.max_eval_batches is None else t.max_eval_batches * t.micro_batch_size * world  # per process
    rows = len(stage.eval) if cap is None else min(len(stage.eval), cap)
    total, trainable, _ = linear_params(model)
    shorter = (4.0 * total + 2.0 * trainable) / train_flops_per_token(model)  # 1 unless layers are frozen
    return rows / global_batch / 3 * shorter


def finish_timing(out_dir: Path, probe: UpdateProbe) -> None:
    """<stage>/timing.json: the stage's time breakdown, utilisation and update figure (rank 0)."""
    stage_clock = clock()
    if D.is_main():
        if stage_clock.train_flops:
            from ..engine.precision import matmul_peak_flops

            stage_clock.peak_flops = matmul_peak_flops(stage_clock.dtype)
        stage_clock.extra.update(probe.summary())
        stage_clock.write(out_dir)


def timed(fn, record, part: str | None = None):
    """fn, reporting its wall time to record(seconds) after each call (and to the stage clock's part)."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        took = time.perf_counter() - t0
        record(took)
        if part:
            clock().add(part, took)
        return out
    return call


@torch.no_grad()
def evaluate(stage: Stage, engine: TrainEngine, t: TrainConfig) -> dict:
    """Summed metrics over the eval split (sharded over ranks), turned into means by stage.eval_metrics."""
    if len(stage.eval) == 0:
        return {}
    engine.eval()
    rank, world = D.init_distributed()
    sums: Counter = Counter()
    # the same number of forwards on every rank (ZeRO-3 gathers parameters collectively)
    for mb, keep in equal_count_batches(len(stage.eval), rank, world, t.micro_batch_size, t.max_eval_batches):
        rows = [stage.eval.row(int(i)) for i in mb]
        loss_sum, metrics = stage.loss(engine, stage.collate(rows))
        if keep:
            sums.update({"loss": loss_sum.item(), "units": stage.units(rows), **metrics})
    keys = ["loss", "units"] + sorted(k for k in sums if k not in ("loss", "units"))
    totals = dict(zip(keys, D.all_reduce_sum([float(sums[k]) for k in keys])))
    out = {"eval/loss": totals["loss"] / max(totals["units"], 1)}
    if stage.eval_metrics:
        out.update(stage.eval_metrics(totals))
    engine.train()
    return out


def save_checkpoint(engine: TrainEngine, stage: Stage, out_dir: Path, step: int, keep: int) -> Path:
    tmp = begin_checkpoint(out_dir, step)
    engine.save_state(tmp, {"step": step})
    stage.export(engine, tmp / "model")
    return finish_checkpoint(tmp, step, keep, {"step": step, "stage": stage.name})


def publish_final(exported: Path, final: Path, eval_metrics: dict) -> None:
    """final/ = the last checkpoint's exported model (hard links, not a second gather and export) plus
    eval.json, moved into place in one rename."""
    tmp = make_temp_dir(final)
    shutil.copytree(exported, tmp, dirs_exist_ok=True, copy_function=link_or_copy)
    (tmp / "eval.json").write_text(json.dumps(eval_metrics, indent=1))
    publish_dir(tmp, final)


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, forget metrics the interrupted run logged past the checkpoint (they are redone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)

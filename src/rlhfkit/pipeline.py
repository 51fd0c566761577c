"""`rlhfkit pipeline CONFIG [--from STAGE]`: data → sft → rm → ppo (or dpo) → eval → export, one run dir.

Stages nothing needs are left out, saying why (plan_stages; pipeline.json's "skipped"): SFT when the run has
no phase-1 data or ppo.actor_model (dpo.model) is set, so RL starts straight from a model; the RM when no
reward, critic or eval judge reads it. The export's settings are checked before the first stage trains.
A stage whose complete output exists is skipped (a training stage is complete when its final/ holds
eval.json, written last); an interrupted stage resumes from its latest checkpoint (each stage's own
auto-resume); `--from STAGE` deletes that stage's outputs and every later stage's, and reruns them.
Wall time per stage goes to <run>/pipeline.json.

With `pipeline.time_budget_minutes`, each training stage gets, when it starts, a share of the time left
(`pipeline.budget_shares`, over the stages still to run) and plans its steps to fit (train/budget.py);
eval plans how many prompts of each set it answers (eval/compare.py). The plans go to pipeline.json with
the overrides that replay them on any machine.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import Config
from .engine import distributed as D
from .errors import ConfigError
from .paths import write_text_atomic
from .timing import clock, start_stage
from .train.guards import lock_run

ALL_STAGES = ("data", "sft", "rm", "ppo", "dpo", "eval", "export")
TRAINING = ("sft", "rm", "ppo", "dpo")
PLANNED = ("sft", "rm", "ppo", "dpo", "eval")  # stages that plan their work from a time budget
PLAN_KEY = {"sft": "sft.max_steps", "rm": "rm.max_steps", "dpo": "dpo.max_steps", "ppo": "ppo.steps",
            "eval": "eval.max_prompts"}


def stages_for(cfg: Config) -> list[str]:
    return plan_stages(cfg)[0]


def plan_stages(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """The stages this config runs, and why it leaves out the others: SFT when nothing reads its output or
    it has no data (RL or DPO then start from a model), the RM when no model of the run reads it."""
    from .train.starts import sft_skip_reason

    skipped = {}
    if sft_skip_reason(cfg):
        skipped["sft"] = sft_skip_reason(cfg)
    if not rm_readers(cfg):
        skipped["rm"] = "nothing reads a reward model trained here: " + "; ".join(rm_not_needed(cfg))
    aligned = cfg.pipeline.alignment
    stages = [s for s in ("data", "sft", "rm", aligned, "eval", "export") if s not in skipped]
    return stages, skipped


def rm_readers(cfg: Config) -> list[str]:
    """What reads the RM stage's model unless the config gives another: the RL reward (a `model` source),
    the critic (gae only; it starts from the reward model unless ppo.critic_model is set), and eval's judge
    (unless eval judges by its text rewards alone or names a reward model), as ppo and eval locate it."""
    from .train.common import uses_reward_model

    p, e = cfg.ppo, cfg.eval
    readers = []
    if cfg.pipeline.alignment == "ppo" and uses_reward_model(p) and not p.reward_model:
        readers.append("the RL reward")
    if cfg.pipeline.alignment == "ppo" and p.uses_critic and not p.critic_model and not p.reward_model:
        readers.append("the critic")
    if not e.rewards and not e.reward_model and not p.reward_model:
        readers.append("eval's judge")
    return readers


def rm_not_needed(cfg: Config) -> list[str]:
    """Why each would-be reader of the RM does without one (for the skip message)."""
    from .train.common import uses_reward_model

    p, e = cfg.ppo, cfg.eval
    if cfg.pipeline.alignment == "dpo":
        why = ["DPO learns from the pairs directly"]
    else:
        why = ["the RL reward reads ppo.reward_model" if uses_reward_model(p)
               else "ppo.reward.sources has no `model` source",
               f"advantage {p.advantage} has no critic" if not p.uses_critic
               else f"the critic starts from {'ppo.critic_model' if p.critic_model else 'ppo.reward_model'}"]
    judge = "eval.reward_model" if e.reward_model else "ppo.reward_model" if p.reward_model else None
    return why + [f"eval's judge is {judge}" if judge else "eval judges by eval.rewards alone"]


def stage_output(cfg: Config, stage: str) -> Path:
    return cfg.output_dir / stage


def is_complete(cfg: Config, stage: str) -> bool:
    out = stage_output(cfg, stage)
    if stage == "data":
        return False  # preparing is a cache hit when nothing changed; always check
    if stage in ("sft", "rm", "ppo", "dpo"):
        return (out / "final" / "eval.json").is_file()
    if stage == "eval":
        return (out / "eval.json").is_file() and (cfg.output_dir / "report.html").is_file()
    return (out / "export.json").is_file()


def stages_to_run(cfg: Config, stages: list[str]) -> list[str]:
    """Collective: the stages every rank runs. A training stage runs unless its final/ is on every node's disk
    (the next stage reads it there); eval and export write on rank 0 only, so rank 0's disk decides those."""
    here = [s for s in stages if not is_complete(cfg, s)]
    missing_somewhere = set().union(*D.all_gather_object({s for s in here if s in TRAINING}))
    on_main = D.broadcast_object(here)
    return [s for s in stages if s in on_main or s in missing_somewhere]


def reset(cfg: Config, stage: str) -> None:
    """Delete a stage's outputs, on every node's disk (collective)."""
    if D.leads_disk(cfg.output_dir) and stage != "data":
        shutil.rmtree(stage_output(cfg, stage), ignore_errors=True)


def run_stage(cfg: Config, stage: str, show_progress: bool, budget=None) -> None:
    from .data.prepare import prepare

    if stage == "data":
        if D.leads_disk(cfg.output_dir):  # every node's disk needs the prepared data
            prepare(cfg, show_progress=show_progress)
        D.barrier()
    elif stage == "sft":
        from .train.sft import run_sft

        run_sft(cfg, show_progress, budget=budget)
    elif stage == "rm":
        from .train.reward import run_rm

        run_rm(cfg, show_progress, budget=budget)
    elif stage == "ppo":
        from .train.ppo.trainer import run_ppo

        run_ppo(cfg, show_progress, budget=budget)
    elif stage == "dpo":
        from .train.dpo import run_dpo

        run_dpo(cfg, show_progress, budget=budget)
    elif stage == "eval":
        if D.is_main():
            with clock().part("eval"):  # the eval stage is all eval (its model loads included)
                evaluate_and_report(cfg, show_progress, budget)
        D.barrier()
    elif stage == "export":
        if D.is_main():
            export_run(cfg)
        D.barrier()


def evaluate_and_report(cfg: Config, show_progress: bool = True, budget=None) -> dict:
    from .eval.compare import format_table, run_eval
    from .eval.report import build_report

    results = run_eval(cfg, show_progress, budget)
    print(format_table(results))
    print(f"report → {build_report(cfg.output_dir)}")
    return results


def export_run(cfg: Config, src: Path | None = None) -> dict:
    """HF directory (+ GGUF and its round-trip check) of the aligned model under <run>/export/."""
    from .eval.compare import aligned_final
    from .export import check_gguf, export_hf, gguf_type, write_gguf

    src = Path(src) if src else aligned_final(cfg)
    out = stage_output(cfg, "export")
    hf = export_hf(src, out / "hf")
    summary: dict = {"source": str(src), "hf_dir": str(hf)}
    qtype, no_gguf = gguf_type(cfg.export.gguf, hf)
    if qtype:
        gguf_file = write_gguf(hf, out / f"model-{qtype}.gguf", qtype)
        summary.update(gguf=str(gguf_file), gguf_type=qtype, round_trip=check_gguf(hf, gguf_file))
    else:
        summary["no_gguf"] = no_gguf
    write_text_atomic(out / "export.json", json.dumps(summary, indent=1))
    print(f"export → {hf}" + (f", {summary['gguf']} (round trip: max |Δlogit| "
                              f"{summary['round_trip']['max_abs_logit_diff']:.4g})" if qtype else f" (no GGUF: {no_gguf})"))
    return summary


def check_budget(cfg: Config, stages: list[str]) -> None:
    """A budgeted stage's plan must replay exactly: its LR schedule may not depend on its step count."""
    from .train.budget import check_budgetable

    for stage in stages:
        if stage in PLANNED and stage not in cfg.pipeline.budget_shares:
            raise ConfigError(f"pipeline.budget_shares has no share for {stage} (it lists {sorted(cfg.pipeline.budget_shares)})")
        if stage not in TRAINING:
            continue
        sections = {"ppo.actor": cfg.ppo.actor, "ppo.critic": cfg.ppo.critic} if stage == "ppo" else {stage: getattr(cfg, stage)}
        for name, t in sections.items():
            check_budgetable(name, t.lr_scheduler, t.warmup_ratio)


def stage_budget(cfg: Config, stage: str, todo: list[str], started: float, plans: dict):
    """This stage's share of the time left, over the stages still to run that have a share; with the longest
    checkpoint the earlier stages' plans timed (`plans`: their plan.json records), the guess for this one's."""
    from .train.budget import StageBudget

    if cfg.pipeline.time_budget_minutes is None or stage not in PLANNED:
        return None
    shares = cfg.pipeline.budget_shares
    now = time.perf_counter()
    left = cfg.pipeline.time_budget_minutes * 60 - (now - started)
    weight = shares[stage] / sum(shares.get(s, 0.0) for s in todo)
    timed = [p["checkpoint_s"] for p in plans.values() if p.get("checkpoints_timed")]
    timed += [p["final_checkpoint_s"] for p in plans.values() if p.get("final_checkpoint_s")]
    return StageBudget(seconds=max(left * weight, 0.0), started=now, checkpoint_s=max(timed, default=None))


def missing_judges(cfg: Config) -> list[str]:
    """Judges the eval reads that no earlier stage writes and that are not on disk: found before the first
    stage trains, not an hour later when the eval loads them."""
    from .models.loading import missing_local_model

    judge = cfg.eval.second_judge
    if judge and missing_local_model(judge):
        return [f"eval.second_judge: {judge} not found (a reward model's directory, such as the final/ of "
                "`rlhfkit rm configs/judge.yaml`)"]
    return []


def check_unchanged(cfg: Config, stage: str) -> None:
    """A finished stage is skipped only if it was made with today's settings."""
    from .engine.precision import resolve_precision
    from .train.common import stage_inputs
    from .train.guards import recorded_changes, stage_fingerprint

    if stage not in TRAINING:
        return
    changes = None
    if D.is_main():  # rank 0's record decides for every rank: nodes without a shared disk have it there only
        resolved = resolve_precision(cfg)
        changes = recorded_changes(stage_output(cfg, stage),
                                   stage_fingerprint(resolved, stage, stage_inputs(resolved, stage)))
    changes = D.broadcast_object(changes)
    if changes:
        listed = "\n  ".join(changes)
        raise ConfigError(f"{stage} finished with other settings than this config's:\n  {listed}\n"
                          f"Rerun it and the stages after it: `rlhfkit pipeline CONFIG --from {stage}`; "
                          f"or restore the settings it was made with.")


def run_pipeline(cfg: Config, from_stage: str | None = None, show_progress: bool = True) -> dict:
    from .export import gguf_export_problem

    started = time.perf_counter()
    stages, skipped = plan_stages(cfg)
    if from_stage is not None and from_stage not in stages:
        why = f" ({from_stage} is skipped: {skipped[from_stage]})" if from_stage in skipped else ""
        raise ConfigError(f"--from {from_stage!r}: this pipeline's stages are {stages}{why}")
    if cfg.pipeline.time_budget_minutes is not None:
        check_budget(cfg, stages)
    # the last stages' inputs and settings, checked before the first trains
    problems = [gguf_export_problem(cfg)] + (missing_judges(cfg) if "eval" in stages else [])
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))
    D.init_distributed()
    if D.is_main():
        print(f"pipeline: stages {' → '.join(stages)}", flush=True)
        for stage, why in skipped.items():
            print(f"pipeline: {stage} skipped: {why}", flush=True)
    lock_run(cfg.output_dir)
    record_file = cfg.output_dir / "pipeline.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    timings, plans = record.setdefault("seconds", {}), record.setdefault("plans", {})
    breakdown = record.setdefault("time", {})
    record["time_budget_minutes"] = cfg.pipeline.time_budget_minutes
    record["stages"], record["skipped"] = stages, skipped
    rerun = stages[stages.index(from_stage):] if from_stage else []
    for stage in rerun:
        reset(cfg, stage)
        timings.pop(stage, None)
        plans.pop(stage, None)
        breakdown.pop(stage, None)
    D.barrier()
    todo = stages_to_run(cfg, stages)
    for stage in stages:
        if stage not in todo:
            check_unchanged(cfg, stage)
            if D.is_main():
                print(f"pipeline: {stage} is complete, skipped", flush=True)
            continue
        budget = stage_budget(cfg, stage, todo[todo.index(stage):], started, plans)
        if D.is_main():
            print(f"pipeline: {stage} ..." + (f" (time budget {budget.seconds:.0f}s)" if budget else ""), flush=True)
        t0 = time.perf_counter()
        stage_clock = start_stage(stage)
        run_stage(cfg, stage, show_progress, budget)
        took = time.perf_counter() - t0
        timings[stage] = took  # for a resumed stage: the part since the resume
        breakdown[stage] = stage_clock.summary(wall=took)
        plan_file = stage_output(cfg, stage) / "plan.json"
        if plan_file.is_file():
            plans[stage] = json.loads(plan_file.read_text())
        if D.is_main():
            write_text_atomic(record_file, json.dumps(record, indent=1))
            print(f"pipeline: {stage} done in {took:.1f}s", flush=True)
    if plans and D.is_main():
        planned = ", ".join(f"{s} {p['planned']}/{p['configured']}" for s, p in plans.items())
        replay = " ".join(f"{PLAN_KEY[s]}={p['planned']}" for s, p in plans.items())
        record["replay_overrides"] = f"{replay} pipeline.time_budget_minutes=null"
        write_text_atomic(record_file, json.dumps(record, indent=1))
        print(f"pipeline: planned steps {planned}; the same run on any machine: {record['replay_overrides']}",
              flush=True)
    if breakdown and D.is_main():
        print(time_table(breakdown), flush=True)
    return record


def time_table(breakdown: dict[str, dict]) -> str:
    """Where the pipeline's time went: each stage's parts, the training steps' share of the whole, and each
    training stage's achieved FLOP/s against the measured matmul peak at its precision."""
    from .engine.precision import measured_file
    from .timing import PARTS

    cols = (*PARTS, "other")
    lines = ["pipeline time (s)".ljust(22) + "  ".join(f"{c:>11}" for c in cols) + f"  {'wall':>10}"]
    for stage, b in breakdown.items():
        lines.append(f"  {stage:<20}" + "  ".join(f"{b['seconds'].get(c, 0.0):11.1f}" for c in cols) + f"  {b['wall_s']:10.1f}")
    wall = sum(b["wall_s"] for b in breakdown.values())
    steps = sum(b["seconds"].get("train_steps", 0.0) for b in breakdown.values())
    lines.append(f"  training steps: {steps:.0f}s of {wall:.0f}s ({100 * steps / max(wall, 1e-9):.0f}%)")
    for stage, b in breakdown.items():
        if b.get("achieved_flops_per_s"):
            peak = b.get("peak_flops_per_s")
            lines.append(f"  {stage}: {b['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s in {b['dtype']}"
                         + (f", {100 * b['utilisation']:.0f}% of the measured matmul peak {peak / 1e9:.0f} GFLOP/s"
                            if peak else "")
                         + (f" (more than the peak: it was measured on a busy machine; delete "
                            f"{measured_file('matmul_flops_' + b['dtype'])} to measure it again)"
                            if peak and b["utilisation"] > 1 else "")
                         + (f"; {100 * b['weights_changed_mean']:.0f}% of compute-copy weights changed per step"
                            if "weights_changed_mean" in b else ""))
    return "\n".join(lines)

"""Print the figures gpu_check.sh reports from a run's own records (metrics.jsonl, pipeline.json).

    python benchmarks/gpu_check_figures.py stage RUN_DIR STAGE LABEL
    python benchmarks/gpu_check_figures.py pipeline RUN_DIR
"""

import json
import sys
from pathlib import Path

STAGE_FIGURES = {  # metric: (shown as, unit)
    "train/step_time_s": ("step", "s"), "train/tokens_per_s": ("tokens/s", ""),
    "time/step": ("step", "s"), "time/generation": ("generation", "s"), "time/experience": ("experience", "s"),
    "time/training": ("training", "s"), "tokens/per_s": ("tokens/s", ""),
}


def last_train_record(run_dir: Path, stage: str) -> dict:
    rows = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if any(k in r for k in STAGE_FIGURES)]
    if not steps:
        sys.exit(f"{run_dir / stage / 'metrics.jsonl'} has no training step")
    return steps[-1]


def show_stage(run_dir: Path, stage: str, label: str) -> None:
    r = last_train_record(run_dir, stage)
    shown = [f"{name} {r[k]:.3f} {unit}".rstrip() for k, (name, unit) in STAGE_FIGURES.items() if r.get(k) is not None]
    print(f"  {label}: " + ", ".join(shown), flush=True)


def show_pipeline(run_dir: Path) -> None:
    record = json.loads((run_dir / "pipeline.json").read_text())
    seconds = record.get("seconds", {})
    print("  tiny pipeline: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), flush=True)


if __name__ == "__main__":
    what, run = sys.argv[1], Path(sys.argv[2])
    if what == "stage":
        show_stage(run, sys.argv[3], sys.argv[4])
    elif what == "pipeline":
        show_pipeline(run)
    else:
        sys.exit(f"unknown: {what}")

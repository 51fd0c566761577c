"""Reward-model variants by accuracy per minute: full fine-tuning (fp32 and bf16), LoRA, frozen lower layers.

    .venv/bin/python benchmarks/rm_variants.py --steps 30 --eval-every 15
    .venv/bin/python benchmarks/rm_variants.py --variants full-fp32 lora-bf16 --steps 10   # a subset

Each variant is the quickstart's RM stage (`rlhfkit rm configs/quickstart.yaml`, its data, batch and learning
rates) with the overrides below, run for the same number of steps in its own process and output dir, one
after another on this machine. Per variant the table gives the precision it ran in, the median step time,
the minutes spent in training steps (timing.json), the eval accuracy after each eval (on the RM's whole eval
split, with its 95% Wilson interval at the end), and the accuracy above chance per training minute.
The machine (CPU model, threads, native bf16, what `auto` resolves to) is printed beside the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = ["rm.lora.r=0", "rm.learning_rate=2e-5"]  # the quickstart's RM trains LoRA adapters
LORA = ["rm.lora.r=16", "rm.lora.alpha=32", "rm.lora.learning_rate=3e-4"]
VARIANTS = {
    "full-fp32": ["rm.dtype=float32", *FULL],
    "full-bf16": ["rm.dtype=bfloat16", *FULL],
    "lora-bf16": ["rm.dtype=bfloat16", *LORA],
    "lora-fp32": ["rm.dtype=float32", *LORA],
    "freeze20-fp32": ["rm.dtype=float32", *FULL, "rm.freeze_layers=20"],
    # LoRA in the top 10 of SmolLM2's 30 layers only: the backward pass stops at layer 20
    "lora-top10-fp32": ["rm.dtype=float32", *LORA, "rm.freeze_layers=20"],
    "lora-top10-bf16": ["rm.dtype=bfloat16", *LORA, "rm.freeze_layers=20"],
    "freeze20-bf16-lr2e-4": ["rm.dtype=bfloat16", *FULL, "rm.freeze_layers=20", "rm.learning_rate=2e-4"],
}


def run_variant(name: str, args) -> dict:
    out = Path(args.out) / name
    cmd = [sys.executable, "-m", "rlhfkit.cli", "rm", args.config, "--no-progress", f"run.output_dir={out}",
           f"rm.max_steps={args.steps}", f"rm.eval_every={args.eval_every}", "rm.save_every=0",
           "rm.eval_at_start=false", "rm.resume=never", *args.overrides, *VARIANTS[name]]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    rows = [json.loads(line) for line in (out / "rm" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timing = json.loads((out / "rm" / "timing.json").read_text())
    steps = [r["train/step_time_s"] for r in rows if "train/step_time_s" in r]
    accuracy = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    return {"variant": name, "dtype": timing.get("dtype"), "median_step_s": statistics.median(steps[1:] or steps),
            "train_min": timing["seconds"]["train_steps"] / 60, "wall_min": timing["wall_s"] / 60,
            "utilisation": timing.get("utilisation"), "accuracy": accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="/tmp/rlhfkit-rm-variants")
    ap.add_argument("overrides", nargs="*", help="more config overrides for every variant (key=value)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from rlhfkit.config import load_config
    from rlhfkit.data.prepare import load_phase, prepare
    from rlhfkit.engine.precision import machine_summary
    from rlhfkit.eval.compare import wilson_interval

    cfg = load_config(REPO / args.config, [f"run.output_dir={Path(args.out) / 'data-only'}", *args.overrides])
    prepare(cfg, show_progress=False)
    pairs = sum(len(t) for _, t in load_phase(cfg.output_dir / "data", 2, "eval"))
    results = [run_variant(name, args) for name in args.variants]
    print(f"\nRM variants, {args.steps} steps each; accuracy on {pairs} held-out pairs; {machine_summary()}")
    print(f"{'variant':<22} {'dtype':>9} {'step s':>7} {'train min':>9} {'util':>5}  accuracy by step"
          f"{'':<14} final [95% CI]      (acc − 0.5)/train min")
    for r in results:
        acc = r["accuracy"]
        final = acc[max(acc)]
        lo, hi = wilson_interval(final, pairs)
        curve = " ".join(f"{s}:{a:.3f}" for s, a in sorted(acc.items()))
        util = f"{100 * r['utilisation']:.0f}%" if r["utilisation"] else "n/a"
        print(f"{r['variant']:<22} {r['dtype']:>9} {r['median_step_s']:>7.2f} {r['train_min']:>9.2f} {util:>5}  "
              f"{curve:<30} {final:.3f} [{lo:.3f}, {hi:.3f}]  {(final - 0.5) / r['train_min']:+.3f}")
    (Path(args.out) / "results.json").write_text(json.dumps({"pairs": pairs, "machine": machine_summary(),
                                                             "results": results}, indent=1))


if __name__ == "__main__":
    main()

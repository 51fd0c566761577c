"""The quickstart's RL stage in variants, each judged by the same eval: which recipe learns most per minute.

    .venv/bin/python benchmarks/quickstart_variants.py --steps 20 --prompts 48
    .venv/bin/python benchmarks/quickstart_variants.py --variants ppo rloo --steps 4 --prompts 8   # quick check

One SFT and one RM run first (`rlhfkit pipeline configs/quickstart.yaml` up to the RM, without a time
budget, with --sft-steps / --rm-steps steps). Every variant then starts from those two models: its run dir
links their outputs, `rlhfkit ppo` trains --steps steps with the variant's overrides, and `rlhfkit eval`
compares its final model with the SFT model on --prompts prompts of each eval set (the same prompts and
per-prompt seeds for every variant), judged by the RM (and by --second-judge, a reward model trained on other
data, e.g. configs/judge.yaml's). Printed per variant: its RL minutes (timing.json's wall time), the pooled
RM gain over every prompt with its 95% paired-bootstrap interval, the same under the second judge, the
per-set gains and the KL to SFT. The machine is printed beside the table.

Per minute rather than per step: --base RUN takes data, SFT and RM from a finished quickstart run, and --minutes M
runs each variant as `rlhfkit pipeline` with a time budget of M minutes (RL and eval plan their steps and prompts
to fit, as in the quickstart; use what RUN had left when its RL stage started):

    .venv/bin/python benchmarks/quickstart_variants.py --base runs/quickstart --minutes 14.1 \
        --second-judge runs/judge/rm/final --variants rloo-2x4 rloo-4x4 rloo-8x4 rloo-2x4-kl0.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RLOO = ["ppo.advantage=rloo", "ppo.critic={}", "ppo.n_samples_per_prompt=4", "ppo.rollout_batch_size=2"]
VARIANTS = {
    "ppo": [],  # the quickstart's PPO (gae + critic) as configured
    "ppo-kl0.02": ["ppo.kl_coef=0.02"],
    "ppo-lr1e-4": ["ppo.actor.learning_rate=1e-4", "ppo.critic.learning_rate=1e-4"],
    "ppo-no-eos-penalty": ["ppo.missing_eos_penalty=null"],
    "rloo": RLOO,  # 2 prompts x 4 replies: the same 8 replies per step, a leave-one-out baseline, no critic
    "rloo-no-eos-penalty": [*RLOO, "ppo.missing_eos_penalty=null"],
    "rloo-lr1e-4": [*RLOO, "ppo.actor.learning_rate=1e-4"],
    "reinforce_pp": ["ppo.advantage=reinforce_pp", "ppo.critic={}"],
    # room for a longer reply that still ends (the RM prefers length; a reply cut at the limit is penalised)
    "rloo-96-tokens": [*RLOO, "ppo.sampling.max_new_tokens=96", "eval.sampling.max_new_tokens=96"],
    # replies per step, in updates of 8: decoding more rows costs little more per token on a CPU
    "rloo-2x4": [*RLOO, "ppo.mini_batch_size=8"],
    "rloo-2x4-kl0.1": [*RLOO, "ppo.mini_batch_size=8", "ppo.kl_coef=0.1"],
    "rloo-4x4": [*RLOO, "ppo.rollout_batch_size=4", "ppo.mini_batch_size=8"],
    "rloo-8x4": [*RLOO, "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8"],
}


def rlhfkit(*args: str) -> None:
    print("$ rlhfkit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args, "--no-progress"], cwd=REPO, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="/tmp/rlhfkit-quickstart-variants")
    ap.add_argument("--sft-steps", type=int, default=48)
    ap.add_argument("--rm-steps", type=int, default=80)
    ap.add_argument("--steps", type=int, default=20, help="RL steps of every variant")
    ap.add_argument("--prompts", type=int, default=48, help="eval prompts per set")
    ap.add_argument("--second-judge", default=None, help="a reward model dir (e.g. runs/judge/rm/final)")
    ap.add_argument("--base", default=None, help="a finished run whose data, SFT and RM every variant starts from")
    ap.add_argument("--minutes", type=float, default=None, help=(
        "time budget of each variant's RL and eval (`rlhfkit pipeline`); instead of --steps and --prompts"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("overrides", nargs="*", help="more config overrides for every run (key=value)")
    args = ap.parse_args()
    if args.minutes and not args.base:
        ap.error("--minutes needs --base: the finished run whose SFT and RM the variants share")
    out = Path(args.out)
    common = [f"pipeline.time_budget_minutes={args.minutes or 'null'}", *args.overrides]

    base = Path(args.base) if args.base else out / "base"
    if args.base is None and not (base / "rm" / "final" / "eval.json").is_file():
        rlhfkit("data", "prepare", args.config, f"run.output_dir={base}", *common)
        rlhfkit("sft", args.config, f"run.output_dir={base}", f"sft.max_steps={args.sft_steps}", *common)
        rlhfkit("rm", args.config, f"run.output_dir={base}", f"rm.max_steps={args.rm_steps}", *common)
    judge = [f"eval.second_judge={Path(args.second_judge).resolve()}"] if args.second_judge else []
    # with a budget the stages plan their own steps; the base run's SFT and RM settings are kept as they were
    fixed = judge if args.minutes else [f"sft.max_steps={args.sft_steps}", f"rm.max_steps={args.rm_steps}",
                                        f"eval.max_prompts={args.prompts}", *judge]
    results = {}
    for name in args.variants:
        run = out / name
        run.mkdir(parents=True, exist_ok=True)
        for stage in ("data", "sft", "rm"):  # the shared SFT and RM, and the data they were made from
            if not (run / stage).exists():
                os.symlink((base / stage).resolve(), run / stage)
        where = [f"run.output_dir={run}", *([] if args.minutes else [f"ppo.steps={args.steps}"]), *fixed, *common,
                 *VARIANTS[name]]
        if not (run / "eval" / "eval.json").is_file():  # a variant already measured is kept (rerun after a stop)
            if args.minutes:  # the SFT and RM are complete: the pipeline skips them and budgets RL and eval
                rlhfkit("pipeline", args.config, *where)
            else:
                if not (run / "ppo" / "final").is_dir():
                    rlhfkit("ppo", args.config, *where)
                rlhfkit("eval", args.config, *where)
        results[name] = {"eval": json.loads((run / "eval" / "eval.json").read_text()),
                         "timing": json.loads((run / "ppo" / "timing.json").read_text()),
                         "steps": (json.loads((run / "ppo" / "plan.json").read_text())["planned"] if args.minutes
                                   else args.steps)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: dict, args) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from rlhfkit.engine.precision import machine_summary
    from rlhfkit.eval.stats import fmt, fmt_interval

    each = (f"RL and eval in {args.minutes} minutes each" if args.minutes
            else f"{args.steps} RL steps each, eval on {args.prompts} prompts per set")
    print(f"\nRL variants from the same SFT and RM, {each}; {machine_summary()}")
    judges = ["rm"] + (["judge2"] if args.second_judge else [])
    print(f"{'variant':<14} {'steps':>5} {'RL min':>6}  " + "  ".join(f"{'pooled ' + j + ' gain [95% CI]':<34}" for j in judges)
          + f"  {'KL':>6}  per set ({judges[0]})")
    for name, r in results.items():
        e = r["eval"]
        pooled = e.get("pooled") or next(iter(e["sets"].values()))
        cells = [f"{fmt(pooled[f'{j}_gain'])} {fmt_interval(pooled[f'{j}_gain_ci'])} (n {pooled['prompts']})"
                 for j in judges]
        per_set = ", ".join(f"{s} {fmt(v['rm_gain'])} {fmt_interval(v['rm_gain_ci'])}" for s, v in e["sets"].items())
        print(f"{name:<14} {r.get('steps', '?'):>5} {r['timing']['wall_s'] / 60:>6.1f}  " + "  ".join(f"{c:<34}" for c in cells)
              + f"  {pooled['kl_to_sft']:>6.2f}  {per_set}")


if __name__ == "__main__":
    main()

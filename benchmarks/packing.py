"""Packed vs padded SFT and RM batches: tokens/s of a training step, and the share of padding positions.

    .venv/bin/python benchmarks/packing.py                                  # SmolLM2-135M, bf16 and fp32
    .venv/bin/python benchmarks/packing.py --steps 2 --warmup 0 --dtypes float32      # smoke run
    .venv/bin/python benchmarks/packing.py --stages rm --lora-r 16 --rm-freeze-layers 20  # the RM, LoRA in the top 10

Method
------
* Data: the quickstart's first dataset (hh-rlhf helpful, ../shared/data/preference/hh_helpful_base_test),
  prepared by rlhfkit's data system with the quickstart's data settings (chat template, EOS appended,
  max_seq_len 256, max_prompt_len 128, phase ratios 2/4/4, eval fraction 0.25). SFT batches are the first
  rows of the phase-1 train split, RM batches the first pairs of the phase-2 train split (chosen + rejected:
  2 x batch sequences), --batch rows each, in order.
* Model and step: the stages' own builders (train/common.trainable_causal_lm, train/reward.build_reward_model,
  full fine-tuning unless --lora-r) and one TrainEngine (DeepSpeed, the given dtype, AdamW) per stage and
  precision. A step is one micro-batch's forward, backward and optimizer step (gradient_accumulation_steps
  1) with the stage's loss: sft_batch_loss (response tokens) or pair_scores + Bradley–Terry.
* Padded (collate_sft, collate_pairs) and packed (collate_sft_packed, collate_pairs_packed) batches of the
  same rows alternate on the same engine, the order rotated every batch, so all see the same process and
  the same machine load. The first --warmup batches are not timed. The RM has two packed layouts: "packed"
  computes each pair's chosen and rejected sequences whole (share_prefix=False), "shared" computes the
  prefix they share once, as rm.packing does.
* tokens/s = real tokens of the timed steps (a pair's shared prefix counted twice, as a padded batch computes
  it) / their summed time; padding = 1 - positions holding a token / positions the model ran (rows x width).

Run from the repository root. DS_ACCELERATOR=cpu is set unless a GPU is present or it is already set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHFKIT_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data" / "preference" / "hh_helpful_base_test.shared.jsonl.gz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8, help="rows (SFT) or pairs (RM) per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--stages", default="sft,rm")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--rm-freeze-layers", type=int, default=0, help=(
        "rm.freeze_layers: the RM's lowest N layers fixed (with --lora-r, adapters above them only)"))
    p.add_argument("--work-dir", default="runs/bench_packing")
    p.add_argument("--out", help="also write the results here as JSON")
    return p.parse_args()


def bench_config(args: argparse.Namespace):
    from rlhfkit.config import Config

    stage = {"micro_batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.warmup + args.steps,
             "learning_rate": 1e-5, "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r}}
    return Config.model_validate({
        "run": {"output_dir": str(Path(args.work_dir).resolve())},
        "model": {"name_or_path": args.model},
        "data": {"datasets": [{"name": "hh_helpful", "path": str(DATA), "format": "preference"}],
                 "phase_ratios": [2, 4, 4], "eval_fraction": 0.25, "seed": 1234, "max_seq_len": 256,
                 "max_prompt_len": 128, "overlong": "truncate", "template": "auto"},
        "sft": {**stage, "loss_on": "response"}, "rm": {**stage, "freeze_layers": args.rm_freeze_layers}})


def first_rows(cfg, phase: int, n: int) -> list[dict]:
    from rlhfkit.data.prepare import load_phase
    from rlhfkit.train.batching import Blend

    blend = Blend([t for _, t in load_phase(cfg.output_dir / "data", phase, "train")])
    if len(blend) < n:
        raise SystemExit(f"phase {phase} has {len(blend)} train rows, fewer than the {n} needed")
    return [blend.row(i) for i in range(n)]


def build(stage: str, cfg):
    """(model, param groups, train config) as the stage builds them."""
    from rlhfkit.train.common import trainable_causal_lm
    from rlhfkit.train.reward import build_reward_model

    if stage == "sft":
        return (*trainable_causal_lm(cfg.model, cfg.sft), cfg.sft)
    return (*build_reward_model(cfg), cfg.rm)


def step(engine, stage: str, batch: dict) -> float:
    """Seconds of one training step (forward, backward, optimizer step) on one micro-batch."""
    import torch
    from rlhfkit.train.losses import bradley_terry_loss
    from rlhfkit.train.reward import pair_scores
    from rlhfkit.train.sft import sft_batch_loss

    t0 = time.perf_counter()
    if stage == "sft":
        loss = sft_batch_loss(engine, batch, engine.device) / batch["loss_mask"].sum()
    else:
        loss = bradley_terry_loss(*pair_scores(engine, batch, engine.device))
    engine.backward(loss)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(stage: str, dtype: str, cfg, rows: list[dict], pad_id: int, args) -> dict:
    from rlhfkit.engine.backend import TrainEngine
    from rlhfkit.train.batching import collate_pairs, collate_sft
    from rlhfkit.train.packing import collate_pairs_packed, collate_sft_packed

    model, groups, t = build(stage, cfg)
    t = t.model_copy(update={"dtype": dtype})
    n_batches = args.warmup + args.steps
    engine = TrainEngine(model, t, n_batches, groups)
    engine.train()
    collates = ({"padded": collate_sft, "packed": collate_sft_packed} if stage == "sft"
                else {"padded": collate_pairs, "packed": lambda rows, pad: collate_pairs_packed(rows, pad, False),
                      "shared": collate_pairs_packed})
    result = {layout: {"seconds": 0.0, "tokens": 0, "filled": 0, "positions": 0, "shapes": []} for layout in collates}
    layouts = list(collates)
    for k in range(n_batches):
        batch_rows = rows[k * args.batch:(k + 1) * args.batch]
        tokens = sum(len(r["input_ids"]) if stage == "sft" else len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in batch_rows)
        for layout in layouts[k % len(layouts):] + layouts[:k % len(layouts)]:
            batch = collates[layout](batch_rows, pad_id)
            seconds = step(engine, stage, batch)
            if k >= args.warmup:
                r = result[layout]
                r["seconds"] += seconds
                r["tokens"] += tokens
                r["filled"] += filled_positions(batch, tokens)
                r["positions"] += batch["input_ids"].numel()
                r["shapes"].append(list(batch["input_ids"].shape))
    del engine, model
    gc.collect()
    for r in result.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["padding"] = 1 - r["filled"] / r["positions"]
    return result


def filled_positions(batch: dict, tokens: int) -> int:
    """Positions holding a token: the real tokens, except in packed pairs, where each row is filled up to its
    last sequence's last token (a shared prefix fills its positions once)."""
    if "attention_mask" not in batch:
        return tokens
    ends = batch["ends"]
    return sum(int(ends[ends[:, 0] == row, 1].max()) + 1 for row in range(batch["input_ids"].shape[0]))


def main() -> None:
    args = parse_args()
    os.chdir(REPO)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlhfkit.data.prepare import prepare
    from rlhfkit.engine.precision import machine_summary

    if not DATA.is_file():
        raise SystemExit(f"data not found: {DATA} (set RLHFKIT_SHARED to the project's shared/ folder)")
    cfg = bench_config(args)
    pad_id = int(prepare(cfg, show_progress=False)["tokenizer"]["pad_id"])
    n_rows = (args.warmup + args.steps) * args.batch
    results = {"model": args.model, "machine": machine_summary(), "batch": args.batch, "timed_steps": args.steps,
               "lora_r": args.lora_r, "rm_freeze_layers": args.rm_freeze_layers, "runs": []}
    print(f"machine: {results['machine']}\nmodel: {args.model}, batch {args.batch}, {args.steps} timed steps "
          f"(+{args.warmup} warm-up) per layout, {'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tuning'}"
          + (f", RM's lowest {args.rm_freeze_layers} layers frozen" if args.rm_freeze_layers else ""),
          flush=True)
    print(f"{'stage':5} {'dtype':9} {'layout':6} {'rows x width (first batch)':>27} {'padding':>8} {'tokens/s':>9} "
          f"{'speed-up':>8}")
    for stage in args.stages.split(","):
        rows = first_rows(cfg, 1 if stage == "sft" else 2, n_rows)
        for dtype in args.dtypes.split(","):
            r = run(stage, dtype, cfg, rows, pad_id, args)
            results["runs"].append({"stage": stage, "dtype": dtype, **r})
            for layout in r:
                x = r[layout]
                speedup = x["tokens_per_s"] / r["padded"]["tokens_per_s"]
                shape = "x".join(map(str, x["shapes"][0]))
                print(f"{stage:5} {dtype:9} {layout:6} {shape:>27} {x['padding']:>8.1%} {x['tokens_per_s']:>9.0f} "
                      f"{speedup:>7.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

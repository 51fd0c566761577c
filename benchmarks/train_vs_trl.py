"""rlhfkit vs TRL: training throughput of one SFT and one reward-model configuration, side by side.

    .venv/bin/python benchmarks/train_vs_trl.py --model smollm2-135m-instruct --steps 6 --micro-batch 8 --dtype auto
    .venv/bin/python benchmarks/train_vs_trl.py --model tiny-random --steps 2 --micro-batch 4      # quick check

Method
------
* Data: rlhfkit's own data system prepares the config's datasets (`load_config` + `prepare`, with
  `data.max_seq_len` / `data.max_prompt_len` overridden). The first (warmup + steps) * micro_batch rows of the
  phase-1 train split (SFT: input_ids, prompt_len) and of the phase-2 train split (RM: chosen_ids,
  rejected_ids, prompt_len) are taken, in order, no shuffling. Both frameworks train on exactly these token ids.
* Same batches on both sides: TRL reads the rows with a sequential sampler, so optimizer step k sees rows
  [k*B, (k+1)*B). rlhfkit's loop draws each step's rows through a seeded permutation (`StepSchedule`), so the
  script lays the selected rows out in a table such that the permutation visits them in that same order
  (row k*B + j goes to index `schedule.rows_for_step(k)[j]`). Every step then has the same rows, the same
  padding and the same token count on both sides; the script checks the logged token counts against it.
* Each stage (SFT, RM) runs in its own fresh process, so neither side is measured in a process that already
  trained another model.
* rlhfkit side: the real stage code, in process: `run_sft(cfg)` and `run_rm(cfg)` (model loading, DeepSpeed
  engine, loop, collate, loss). The only substitution is the stage's data loader (`stage_data`), patched to
  return the table above and an empty eval split, so no eval pass runs. Per-step `train/step_time_s` is read
  from `<output_dir>/{sft,rm}/metrics.jsonl`; it covers fetching and collating the batch, forward, backward
  and the optimizer step (not logging, eval, checkpointing or export, which happen outside it).
* TRL side: TRL's SFTTrainer and RewardTrainer in their own virtualenv (benchmarks/.venv-trl, made on first
  use: trl==1.16.0 with torch==2.13.0 and the project's transformers version, nothing added to the project's
  dependencies), run by a small runner script written to a temp file. Rows go in pre-tokenized, so TRL does
  no tokenization: SFT gets input_ids + completion_mask (completion-only loss, the same target tokens as
  rlhfkit's response-only loss), RM gets chosen_ids + rejected_ids. A TrainerCallback records on_step_begin
  and on_step_end; the step time is the time from the previous step's end to this step's end, which, like
  rlhfkit's, includes fetching and collating the batch (begin->end is reported as well).
* Shared settings: model (the same converted directory), micro batch, gradient_accumulation_steps=1, dtype
  (--dtype, default auto: bfloat16 where the CPU runs it natively, AVX512-BF16 or AMX, else float32),
  learning rate, AdamW betas/eps/weight decay (torch.optim.AdamW on both sides, non-fused on CPU),
  LR schedule and warmup, gradient clipping, no gradient checkpointing, no eval, no checkpoint saving,
  logging off. The first step of each run is warm-up and is not timed on either side.
* Result: tokens/s = real (non-padding) tokens of the timed steps / their summed step time; ratio =
  rlhfkit tokens/s / TRL tokens/s (> 1: rlhfkit is faster). Every row shows the precision it ran in; the
  machine (CPU model, threads, torch's CPU capability, native bf16 or not, what `auto` resolves to) is
  printed at the start and beside the table and stored in the results, as each side's process saw it.

Known differences (they are part of what the frameworks do, not of the benchmark; see the report's notes)
* Precision: with bfloat16, rlhfkit runs DeepSpeed bf16 (bf16 weights and activations, fp32 master weights
  in ZeRO-1); TRL/Trainer runs torch.autocast(bf16) over fp32 weights.
* SFT LM head: rlhfkit projects only the hidden states that predict a response token; TRL 1.16's fused LM
  head projects every position (prompt and padding too) on non-CUDA devices, in fp32 on CPU, and computes
  entropy and top-1 metrics alongside.
* RM: TRL's AutoModelForSequenceClassification finds the last token through pad_token_id; when pad == EOS it
  scores the token before the final EOS (rlhfkit reads the last real token from lengths). Same cost.

Run from anywhere; the script works in the repository root (the configs' data paths are relative to it).
DS_ACCELERATOR=cpu is set for this process and its children unless already set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import time

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / "benchmarks" / ".venv-trl"
TRL_VERSION = "1.16.0"
TORCH_PIN = "2.13.0"  # unpinned, pip would pull a multi-GB CUDA build; 2.13.0 resolves to the local CPU wheel
RESULT_TAG = "TRL_RESULT "
STAGES = ("sft", "rm")
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model.name_or_path (built-in name, dir or hub id)")
    p.add_argument("--config", default="configs/quickstart.yaml", help="rlhfkit config giving the data and stage settings")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per stage")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps before them")
    p.add_argument("--micro-batch", type=int, default=8, help="rows (SFT) or pairs (RM) per step")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bfloat16 where bf16 is native, else float32")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--max-prompt-len", type=int, default=128)
    p.add_argument("--stages", default="sft,rm", help="comma-separated subset of sft,rm")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on both sides (default: torch's default, reported in the results)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_vs_trl.json"))
    p.add_argument("--work-dir", default=None, help="keep run dirs here (default: a temp dir, removed afterwards)")
    return p.parse_args()


# --- the TRL virtualenv -----------------------------------------------------------------------------
def ensure_trl_venv(venv: Path, transformers_version: str) -> Path:
    """benchmarks/.venv-trl with trl==1.16.0, torch==2.13.0 and the project's transformers; made once."""
    python = venv / "bin" / "python"
    want = {"trl": TRL_VERSION, "torch": TORCH_PIN, "transformers": transformers_version}
    if python.exists() and _venv_versions(python, want) == want:
        return python
    print(f"setting up {venv} (trl=={TRL_VERSION}, torch=={TORCH_PIN}, transformers=={transformers_version}) ...",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={TORCH_PIN}\ntransformers=={transformers_version}\n")
    constraints = ["-c", f.name]
    if (REPO / "constraints.txt").is_file():  # the project's pins for the shared deps (accelerate, datasets …)
        constraints += ["-c", str(REPO / "constraints.txt")]
    try:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *constraints, f"trl=={TRL_VERSION}"],
                       check=True)
    finally:
        os.unlink(f.name)
    got = _venv_versions(python, want)
    if got != want:
        raise SystemExit(f"{venv}: expected {want}, got {got}")
    return python


def _venv_versions(python: Path, want: dict) -> dict:
    code = ("import importlib.metadata as m, json; "
            f"print(json.dumps({{k: m.version(k).split('+')[0] for k in {sorted(want)!r}}}))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


# --- data ---------------------------------------------------------------------------------------------
def load_bench_config(args: argparse.Namespace, output_dir: Path, n_steps: int):
    """The run config: the given config with the model, lengths and both stages' step settings overridden."""
    from rlhfkit.config import load_config

    overrides = [f"run.output_dir={output_dir}", f"model.name_or_path={args.model}",
                 f"data.max_seq_len={args.max_seq_len}", f"data.max_prompt_len={args.max_prompt_len}"]
    for stage in STAGES:
        overrides += [f"{stage}.{k}={v}" for k, v in {
            "max_steps": n_steps, "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1,
            "dtype": args.dtype, "resume": "never", "gradient_checkpointing": "false",
            # no eval, no intermediate checkpoints: only the final export/checkpoint, outside the step timer
            "eval_every": 0, "max_eval_batches": 1, "save_every": 0, "log_every": 1,
        }.items()]
    overrides.append("sft.loss_on=response")  # what TRL's completion-only loss computes
    cfg = load_config(args.config, overrides)
    if cfg.sft.lora.enabled or cfg.rm.lora.enabled:
        raise SystemExit("this benchmark compares full fine-tuning; turn LoRA off in the config")
    return cfg


def select_rows(cfg, phase: int, n: int) -> list[dict]:
    """The first n train rows of a phase, in the order rlhfkit's Blend lists them."""
    from rlhfkit.data.prepare import load_phase
    from rlhfkit.train.batching import Blend

    blend = Blend([t for _, t in load_phase(cfg.output_dir / "data", phase, "train")])
    if len(blend) < n:
        raise SystemExit(f"phase {phase} has {len(blend)} train rows, fewer than the {n} needed")
    return [blend.row(i) for i in range(n)]


def schedule_ordered_table(rows: list[dict], t):
    """A table whose rows rlhfkit's StepSchedule visits in list order: step k gets rows[k*B:(k+1)*B]."""
    from rlhfkit.data.table import TokenTable
    from rlhfkit.train.batching import StepSchedule

    batch = t.micro_batch_size * t.gradient_accumulation_steps  # one process
    schedule = StepSchedule(len(rows), batch, t.seed, t.epochs, t.max_steps)
    placed: list[dict | None] = [None] * len(rows)
    for step in range(t.max_steps):
        for j, idx in enumerate(schedule.rows_for_step(step)):
            placed[int(idx)] = rows[step * batch + j]
    assert all(r is not None for r in placed), "the schedule must visit every selected row exactly once"
    ragged = [c for c, v in rows[0].items() if hasattr(v, "tolist")]
    scalars = [c for c in rows[0] if c not in ragged]
    return TokenTable(ragged={c: [r[c].tolist() for r in placed] for c in ragged},
                      scalars={c: [r[c] for r in placed] for c in scalars})


def step_tokens(stage: str, rows: list[dict], batch: int) -> list[int]:
    """Real (non-padding) tokens of each step's rows, as both frameworks count them."""
    per_row = ([len(r["input_ids"]) for r in rows] if stage == "sft"
               else [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows])
    return _per_step(per_row, batch)


def step_targets(rows: list[dict], batch: int) -> list[int]:
    """SFT loss targets of each step (response tokens), what rlhfkit's response-only loss averages over."""
    return _per_step([len(r["input_ids"]) - r["prompt_len"] for r in rows], batch)


def _per_step(per_row: list[int], batch: int) -> list[int]:
    return [sum(per_row[i:i + batch]) for i in range(0, len(per_row), batch)]


# --- rlhfkit ------------------------------------------------------------------------------------------
def run_rlhfkit(stage: str, cfg, rows: list[dict], pad_id: int) -> dict:
    """Run the real stage in process on the selected rows; return per-step times and tokens from metrics.jsonl."""
    import torch
    from rlhfkit.engine.precision import machine_summary
    from rlhfkit.tracking import read_metrics
    from rlhfkit.train import reward, sft
    from rlhfkit.train.batching import Blend

    module, run, t = (sft, sft.run_sft, cfg.sft) if stage == "sft" else (reward, reward.run_rm, cfg.rm)
    table = schedule_ordered_table(rows, t)

    def stage_data(_cfg, _phase, _show_progress):  # the selected rows; an empty eval split (no eval passes)
        return Blend([table]), Blend([]), pad_id

    out_dir = cfg.output_dir / stage
    shutil.rmtree(out_dir, ignore_errors=True)
    with mock.patch.object(module, "stage_data", stage_data):
        run(cfg, show_progress=False)
    logged = sorted((m for m in read_metrics(out_dir / "metrics.jsonl") if "train/step_time_s" in m),
                    key=lambda m: m["step"])
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the end-of-run checkpoint: large, not needed
    return {"step_s": [m["train/step_time_s"] for m in logged],
            "tokens": [round(m["train/tokens_per_s"] * m["train/step_time_s"]) for m in logged],
            "threads": torch.get_num_threads(), "dtype": t.dtype, "machine": machine_summary()}


# --- TRL ----------------------------------------------------------------------------------------------
TRL_RUNNER = r'''
"""Runs TRL's SFTTrainer or RewardTrainer on pre-tokenized rows; prints per-step times as JSON."""
import importlib.util, json, sys, time

spec = json.load(open(sys.argv[1]))

import datasets, torch, transformers, trl
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
# rlhfkit's precision module (it needs only torch) describes the machine as this process sees it
_precision = importlib.util.spec_from_file_location("precision", spec["precision_py"])
precision = importlib.util.module_from_spec(_precision)
_precision.loader.exec_module(precision)
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback)
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.begin, self.end = [], []

    def on_step_begin(self, args, state, control, **kw):
        self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.end.append(time.perf_counter())


rows = [json.loads(line) for line in open(spec["rows"])]
tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
tokenizer.pad_token = tokenizer.convert_ids_to_tokens(spec["pad_id"])  # the pad id rlhfkit pads with

common = dict(
    output_dir=spec["output_dir"],
    max_steps=spec["max_steps"],
    per_device_train_batch_size=spec["micro_batch"],
    gradient_accumulation_steps=1,
    learning_rate=spec["learning_rate"],
    lr_scheduler_type=spec["lr_scheduler"],
    warmup_steps=spec["warmup_steps"],
    adam_beta1=spec["adam_betas"][0],
    adam_beta2=spec["adam_betas"][1],
    adam_epsilon=1e-8,
    weight_decay=spec["weight_decay"],
    max_grad_norm=spec["max_grad_norm"],
    optim="adamw_torch",                  # torch.optim.AdamW, like rlhfkit's client optimizer (TRL's default is fused)
    bf16=spec["dtype"] == "bfloat16",
    fp16=False,
    gradient_checkpointing=False,         # TRL defaults to True; rlhfkit runs without
    use_cpu=not torch.cuda.is_available(),
    train_sampling_strategy="sequential", # step k gets rows [k*B, (k+1)*B), the rows rlhfkit's step k gets
    dataloader_num_workers=0,
    dataloader_pin_memory=False,
    eval_strategy="no",
    save_strategy="no",
    logging_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=spec["seed"],
    max_length=None,                      # rows are already cut to max_seq_len; no truncation or filtering
)
if spec["stage"] == "sft":
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    data = datasets.Dataset.from_list([
        {"input_ids": r["input_ids"],
         "completion_mask": [0] * r["prompt_len"] + [1] * (len(r["input_ids"]) - r["prompt_len"])} for r in rows])
    args = SFTConfig(**common, completion_only_loss=True, padding_free=False, packing=False, shuffle_dataset=False)
    trainer_cls = SFTTrainer
else:
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32)
    margin = {"margin": spec["margin"]} if spec["margin"] else {}  # rlhfkit's Bradley-Terry margin, if any
    data = datasets.Dataset.from_list(
        [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"], **margin} for r in rows])
    args = RewardConfig(**common, center_rewards_coefficient=spec["center_coef"] or None)
    trainer_cls = RewardTrainer

timer = StepTimer()
trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
assert len(trainer.train_dataset) == len(rows), "TRL dropped or added rows"

# Count the real tokens (and SFT loss targets) of every batch the collator builds; batches come in step order
# (the dataloader may prefetch one more).
collate, batch_tokens, batch_targets = trainer.data_collator, [], []
def counting_collator(examples):
    batch = collate(examples)
    batch_tokens.append(int(batch["attention_mask"].sum()))
    if "labels" in batch:
        batch_targets.append(int((batch["labels"][:, 1:] != -100).sum()))
    return batch
trainer.data_collator = counting_collator

trainer.train()
n = len(timer.end)
print("TRL_RESULT " + json.dumps({
    "step_s": [timer.end[i] - (timer.end[i - 1] if i else timer.begin[i]) for i in range(n)],
    "compute_s": [timer.end[i] - timer.begin[i] for i in range(n)],
    "tokens": batch_tokens[:n],
    "targets": batch_targets[:n],
    "threads": torch.get_num_threads(),
    "dtype": "bfloat16" if args.bf16 else str(model.dtype).removeprefix("torch."),  # bf16: autocast
    "machine": precision.machine_summary(),
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                 "datasets": datasets.__version__},
}))
'''


def run_trl(stage: str, python: Path, cfg, rows: list[dict], pad_id: int, work: Path, threads: int | None) -> dict:
    """Run the TRL runner on the same rows with the stage's settings; return its parsed JSON."""
    from rlhfkit.engine import precision as precision_module
    from rlhfkit.models.loading import resolve_model_dir

    t = cfg.sft if stage == "sft" else cfg.rm
    mcfg = cfg.model if stage == "sft" or t.model is None else cfg.model.model_copy(update={"name_or_path": t.model})
    work.mkdir(parents=True, exist_ok=True)
    rows_file, spec_file, runner = work / "rows.jsonl", work / "spec.json", work / "trl_runner.py"
    rows_file.write_text("".join(json.dumps({k: v.tolist() if hasattr(v, "tolist") else v for k, v in r.items()})
                                 + "\n" for r in rows))
    spec_file.write_text(json.dumps({
        "stage": stage, "rows": str(rows_file), "output_dir": str(work / "out"), "pad_id": pad_id, "threads": threads,
        "precision_py": precision_module.__file__,  # the runner loads it for its machine line
        "model_dir": resolve_model_dir(mcfg.name_or_path, mcfg, mcfg.revision),
        "max_steps": t.max_steps, "micro_batch": t.micro_batch_size, "dtype": t.dtype, "seed": t.seed,
        "learning_rate": t.learning_rate, "lr_scheduler": t.lr_scheduler, "adam_betas": list(t.adam_betas),
        "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm or 0.0,
        # rlhfkit's warmup: warmup_steps, else round(warmup_ratio * total steps)
        "warmup_steps": t.warmup_steps or int(round(t.warmup_ratio * t.max_steps)),
        "margin": getattr(t, "margin", 0.0), "center_coef": getattr(t, "center_coef", 0.0),
    }))
    runner.write_text(TRL_RUNNER)
    # rlhfkit's in-process run made this process a world of one (RANK, MASTER_PORT … in os.environ); the child
    # must not inherit that, or accelerate would try to join a process group on the port this process holds.
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update({"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"], "HF_HUB_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run([str(python), str(runner), str(spec_file)], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"TRL {stage} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG):])


# --- results ------------------------------------------------------------------------------------------
def summarize(run: dict, warmup: int, expected_tokens: list[int], who: str, stage: str) -> dict:
    """Median step time and tokens/s over the timed steps (the warm-up steps dropped)."""
    if run["tokens"][: len(expected_tokens)] != expected_tokens:
        raise SystemExit(f"{who} {stage}: tokens per step {run['tokens']} differ from the selected rows' "
                         f"{expected_tokens}: the two frameworks did not see the same batches")
    times, tokens = run["step_s"][warmup:], expected_tokens[warmup:]
    return {"timed_steps": len(times), "median_step_s": statistics.median(times),
            "tokens_per_step": statistics.mean(tokens), "tokens_per_s": sum(tokens) / sum(times),
            "step_s": run["step_s"], "tokens": run["tokens"], "torch_threads": run["threads"],
            "dtype": run["dtype"], "machine": run["machine"],
            **({"compute_s": run["compute_s"]} if "compute_s" in run else {})}


def print_table(result: dict) -> None:
    print()
    print(f"{'stage':<6} {'framework':<9} {'dtype':<8} {'rows/step':>9} {'timed steps':>11} {'median step s':>13} "
          f"{'tokens/step':>11} {'tokens/s':>10}")
    for stage, r in result["stages"].items():
        for who in ("rlhfkit", "trl"):
            s = r[who]
            print(f"{stage:<6} {who:<9} {s['dtype']:<8} {r['rows_per_step']:>9} {s['timed_steps']:>11} "
                  f"{s['median_step_s']:>13.3f} {s['tokens_per_step']:>11.0f} {s['tokens_per_s']:>10.1f}")
        print(f"{stage:<6} ratio rlhfkit/TRL tokens/s ({r['rlhfkit']['dtype']}): {r['ratio_rlhfkit_over_trl']:.2f}x")
    print()
    print("machine:  ", result["machine"])
    for stage, r in result["stages"].items():
        for who in ("rlhfkit", "trl"):
            if r[who]["machine"] != result["machine"]:
                print(f"  {stage} {who} saw: {r[who]['machine']}")
    print("precision:", result["precision"])
    print("versions: ", ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print("model:    ", result["model"], f"(max_seq_len {result['max_seq_len']}, max_prompt_len {result['max_prompt_len']})")


def versions(trl_versions: dict) -> dict:
    import deepspeed
    import torch
    import transformers

    return {"python": platform.python_version(), "torch (rlhfkit)": torch.__version__,
            "transformers (rlhfkit)": transformers.__version__, "deepspeed": deepspeed.__version__,
            **{f"{k} (TRL venv)": v for k, v in trl_versions.items()}}


def precision(cfg, dtype: str) -> str:
    from rlhfkit.engine.backend import effective_zero_stage

    if dtype == "float32":
        return "float32 on both sides"
    return (f"bfloat16: rlhfkit DeepSpeed bf16 (bf16 weights and activations, fp32 master weights, ZeRO-"
            f"{effective_zero_stage(cfg.sft)}); TRL torch.autocast(bf16) over fp32 weights")


def run_stages_in_own_processes(args, stages: list[str]) -> None:
    """One fresh process per stage: a stage run in a process that already trained another model is slower
    (measured: our RM 248 tokens/s after our SFT in the same process, 293 alone), which is not a fair figure."""
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="train_vs_trl-parts-") as parts:
        for stage in stages:
            part = Path(parts) / f"{stage}.json"
            argv = [a for a in sys.argv[1:]]
            for flag in ("--stages", "--out"):  # replace these two, keep every other option as given
                while flag in argv:
                    i = argv.index(flag)
                    del argv[i:i + 2]
                argv = [a for a in argv if not a.startswith(flag + "=")]
            subprocess.run([sys.executable, __file__, *argv, "--stages", stage, "--out", str(part)], check=True)
            one = json.loads(part.read_text())
            result = {**one, "stages": {**result.get("stages", {}), **one["stages"]}}
    print_table(result)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


def main() -> None:
    args = parse_args()
    stages = [s for s in args.stages.split(",") if s]
    assert set(stages) <= set(STAGES), f"--stages takes a subset of {STAGES}"
    if len(stages) > 1:
        return run_stages_in_own_processes(args, stages)
    config = Path(args.config)
    config = config if config.is_file() else REPO / config
    args.config = str(config.resolve())
    out = Path(args.out).resolve()
    os.chdir(REPO)  # the configs' data paths (../shared) are relative to the repository root

    import torch
    import transformers
    from rlhfkit.data.prepare import prepare
    from rlhfkit.engine.precision import machine_summary, resolve_dtype

    if args.threads:  # before the machine line, so it shows the threads both sides run with
        torch.set_num_threads(args.threads)
    asked, args.dtype = args.dtype, resolve_dtype(args.dtype, "--dtype")
    if args.dtype not in ("bfloat16", "float32"):  # auto on a GPU without bf16: TRL's side has no float16 here
        raise SystemExit(f"--dtype {asked} resolved to {args.dtype}; this benchmark runs bfloat16 or float32")
    print(f"machine: {machine_summary()}\ndtype: {args.dtype}{' (auto)' if asked == 'auto' else ''}", flush=True)

    n_steps = args.warmup + args.steps
    n_rows = n_steps * args.micro_batch
    python = ensure_trl_venv(TRL_VENV, transformers.__version__)

    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="train_vs_trl-"))
    try:
        cfg = load_bench_config(args, work / "rlhfkit", n_steps)
        manifest = prepare(cfg, show_progress=False)
        pad_id = int(manifest["tokenizer"]["pad_id"])
        result = {"model": args.model, "config": args.config, "machine": machine_summary(), "dtype": args.dtype,
                  "micro_batch": args.micro_batch,
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "max_seq_len": args.max_seq_len,
                  "max_prompt_len": args.max_prompt_len, "stages": {}}
        trl_versions: dict = {}
        for stage in stages:
            rows = select_rows(cfg, 1 if stage == "sft" else 2, n_rows)
            expected = step_tokens(stage, rows, args.micro_batch)
            print(f"{stage}: rlhfkit, {n_steps} steps of {args.micro_batch} rows ...", flush=True)
            t0 = time.perf_counter()
            ours = run_rlhfkit(stage, cfg, rows, pad_id)
            print(f"{stage}: rlhfkit done in {time.perf_counter() - t0:.0f}s; TRL ...", flush=True)
            t0 = time.perf_counter()
            theirs = run_trl(stage, python, cfg, rows, pad_id, work / "trl" / stage, args.threads)
            print(f"{stage}: TRL done in {time.perf_counter() - t0:.0f}s", flush=True)
            trl_versions = theirs["versions"]
            if stage == "sft" and theirs["targets"] != step_targets(rows, args.micro_batch):
                raise SystemExit(f"TRL SFT loss targets per step {theirs['targets']} differ from the response tokens "
                                 f"{step_targets(rows, args.micro_batch)}: not a completion-only loss")
            r = {"rows_per_step": args.micro_batch,
                 "rlhfkit": summarize(ours, args.warmup, expected, "rlhfkit", stage),
                 "trl": summarize(theirs, args.warmup, expected, "TRL", stage)}
            r["ratio_rlhfkit_over_trl"] = r["rlhfkit"]["tokens_per_s"] / r["trl"]["tokens_per_s"]
            result["stages"][stage] = r
        result["versions"] = versions(trl_versions)
        result["precision"] = precision(cfg, args.dtype)
        print_table(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {out}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

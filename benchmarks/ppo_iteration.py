"""The reference PPO iteration: the figure rlhfkit's PPO speed is judged by, side by side with TRL 0.28.0.

    .venv/bin/python benchmarks/ppo_iteration.py                  # fp32, fp32-lora, TRL fp32 (+ bf16-lora if native)
    .venv/bin/python benchmarks/ppo_iteration.py --sides fp32 --iters 2   # quick look at one setting

The iteration (the same on every side)
* SmolLM2-135M-Instruct as actor, reference, critic and reward (critic and reward: the same backbone with a
  freshly initialised scalar head, seed 0).
* 8 real prompts, the first 8 of ../shared/data/ppo/hh_prompts.jsonl.gz, rendered with the chat template and
  left-truncated to at most 256 tokens (rlhfkit's data pipeline does both; TRL gets the same token ids).
* 64 new tokens sampled at temperature 0.7 (no top-k / top-p). Both sides decode exactly 64 tokens: EOS does
  not stop generation here (TRL's PPOTrainer without stop_token does the same), so the work is identical.
* 1 PPO epoch, 1 mini-batch of 8: one actor and one critic optimizer step (AdamW).
* Median seconds per iteration over --iters iterations after --warmup, with the split generation /
  experience (the four models scoring the rollouts) / training, tokens generated, and peak memory
  (max RSS on CPU, max allocated on GPU), each side with the precision it ran in.
* The machine (CPU model, threads, torch's CPU capability, native bf16 or not, what `dtype: auto` resolves
  to) is printed at the start and beside the report, and stored with the results, each worker's own too.
* Ratio: TRL's seconds per iteration / a side's (> 1: rlhfkit is faster). TRL runs in fp32, so only the
  fp32 sides compare at the same precision; a bf16 side's ratio is printed labelled as a different precision.

Sides, each in its own fresh process (all rlhfkit sides score right-padded rows, padded to the longest). Every
rlhfkit side states its precision for actor, critic, reference, reward and rollout copy (never `auto`).
By default: fp32, fp32-lora, trl, and bf16-lora where bf16 is native (a CPU with AVX512-BF16 or AMX, a GPU
with bf16); on other machines bf16 runs a slow fallback, so it is left out unless asked for with --sides.
* fp32: everything in fp32 (actor, critic, reference, reward, rollouts), full fine-tuning. The rollout copy
  is then exactly the trained actor (full fine-tune, same precision, no dropout), so rlhfkit reuses the
  rollout's log-probs as PPO's old log-probs and skips one actor forward per step (bf16 does the same).
* fp32-recompute: fp32 with ppo.reuse_rollout_logprobs off (the actor recomputes the old log-probs): what
  the reuse saves.
* fp32-lora: actor and critic with LoRA (r 16, alpha 32, on the attention projections q, k, v, o; the
  critic's value head trains fully), everything in fp32, fp32 rollout copy with LoRA merged. Merged
  weights round differently from the actor's separate adapters, so the actor recomputes the old
  log-probs (both LoRA sides do).
* bf16-lora: the same LoRA under DeepSpeed bf16 (fp32 master weights, ZeRO-1), bf16 reference and reward,
  bf16 rollout copy with LoRA merged: rlhfkit's best settings on a CPU with native bf16.
* bf16: full fine-tuning of actor and critic in bf16, the rest as bf16-lora.
* trl: TRL 0.28.0's PPOTrainer (the last TRL with PPO) in fp32, in its own virtualenv made by this script
  (benchmarks/.venv-trl-ppo: trl==0.28.0, transformers==4.57.6, torch==2.13.0). transformers 4.57 cannot
  read the config and tokenizer files transformers 5 writes (rope_parameters, the tokenizer class), so TRL
  gets a 4.x-readable copy: the same model.safetensors, config.json with rope_theta, and tokenizer.json
  with a PreTrainedTokenizerFast tokenizer_config.json. TRL's per-iteration time is taken between its
  on_step_end callbacks; its generation time by wrapping trl's batch_generation; the rest of the update
  is reported as experience + training.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHFKIT_SHARED", REPO.parent / "shared"))
PROMPTS = SHARED / "data" / "ppo" / "hh_prompts.jsonl.gz"
TRL_VENV = REPO / "benchmarks" / ".venv-trl-ppo"
TRL_PINS = {"trl": "0.28.0", "transformers": "4.57.6", "torch": "2.13.0"}
RESULT = "RESULT "
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # attention only (rlhfkit's default)
SIDE_DTYPE = {"fp32": "float32", "fp32-recompute": "float32", "fp32-lora": "float32", "bf16": "bfloat16",
              "bf16-lora": "bfloat16", "trl": "float32"}
DEFAULT_SIDES = ["fp32", "fp32-lora", "trl", "bf16-lora"]
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sides", default=None,
                    help=f"comma-separated, of {', '.join(SIDE_DTYPE)} (default: {','.join(DEFAULT_SIDES)}; "
                         "bf16 sides only where bf16 is native)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ppo_iteration.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


# --- shared inputs -------------------------------------------------------------------------------------
def prepare_inputs(args, work: Path) -> dict:
    """Prompt file, rlhfkit config, the prompts' token ids, and the reward/critic model dir."""
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.models.reward import RewardModel

    records = []
    with gzip.open(PROMPTS, "rt", encoding="utf-8") as f:
        for line in f:
            records.append({"id": json.loads(line)["id"], "prompt": json.loads(line)["prompt"]})
            if len(records) == args.prompts:
                break
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in records))

    model_dir = resolve_model_dir(args.model, ModelConfig(name_or_path=args.model))
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(model_dir)
    rm_dir = work / "reward"
    RewardModel.save(rm_dir, rm.state_dict(), rm.backbone.config, 0.0, 1.0)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, rm_dir / name)
    return {"model_dir": str(model_dir), "reward_dir": str(rm_dir), "prompts_file": str(prompts_file)}


def rlhfkit_config(args, work: Path, inputs: dict, side: str):
    from rlhfkit.config import Config

    dtype = SIDE_DTYPE[side]
    trainable = {"dtype": dtype, "micro_batch_size": args.prompts, "learning_rate": 1e-6}
    if side.endswith("lora"):
        trainable["lora"] = {"r": 16, "alpha": 32, "target_modules": LORA_TARGETS}
    raw = {
        "run": {"output_dir": str(work / f"run-{side}")},
        "model": {"name_or_path": inputs["model_dir"]},
        "data": {"datasets": [{"name": "hh_prompts", "path": inputs["prompts_file"], "format": "prompt",
                               "eval_path": inputs["prompts_file"]}],  # an eval split of its own: none carved
                 "cache_dir": str(work / "cache"), "phase_ratios": [0, 0, 1],
                 "max_prompt_len": args.prompt_len, "max_seq_len": args.prompt_len + args.new_tokens},
        "ppo": {"actor_model": inputs["model_dir"], "critic_model": inputs["reward_dir"],
                "reward_model": inputs["reward_dir"], "rollout_batch_size": args.prompts, "ppo_epochs": 1,
                "sampling": {"max_new_tokens": args.new_tokens, "temperature": 0.7},
                "rollout_dtype": dtype,
                "actor": trainable, "critic": trainable,
                "reference": {"dtype": dtype}, "reward": {"dtype": dtype}, "steps": args.warmup + args.iters,
                "reuse_rollout_logprobs": side != "fp32-recompute"},
    }
    return Config.model_validate(raw)


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker_rlhfkit(args, work: Path, side: str) -> dict:
    import torch

    from rlhfkit.train.ppo.trainer import PPOTrainer

    inputs = json.loads((work / "inputs.json").read_text())
    trainer = PPOTrainer(rlhfkit_config(args, work, inputs, side), show_progress=False)
    trainer.stop_ids = [trainer.actor.module.lm.config.vocab_size]  # an id nothing emits: decode all 64 tokens
    per_step = []
    for step in range(args.warmup + args.iters):
        m = trainer.step(step)
        print(f"  {side} iteration {step}: {m['time/step']:.2f}s (generation {m['time/generation']:.2f}, "
              f"experience {m['time/experience']:.2f}, training {m['time/training']:.2f} of which rollout-copy "
              f"refresh {m['time/rollout_refresh']:.2f})", flush=True)
        if step >= args.warmup:
            per_step.append(m)
    med = lambda k: statistics.median(m[k] for m in per_step)  # noqa: E731
    return {"side": side, "dtype": trainer.actor_t.dtype,
            "rollout_dtype": str(trainer.policy.model.dtype).removeprefix("torch."),
            "old_logprobs_from_rollout": trainer.reuse_logprobs,
            "seconds_per_iteration": med("time/step"), "generation_s": med("time/generation"),
            "experience_s": med("time/experience"), "training_s": med("time/training"),
            "tokens_generated": per_step[-1]["tokens/generated"], "peak_memory_gb": peak_memory_gb(),
            "threads": torch.get_num_threads(), "iterations": [m["time/step"] for m in per_step]}


# --- TRL 0.28 ----------------------------------------------------------------------------------------
def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    code = ("import importlib.metadata as m, json; "
            f"print(json.dumps({{k: m.version(k).split('+')[0] for k in {sorted(TRL_PINS)!r}}}))")
    if python.exists():
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        if r.returncode == 0 and json.loads(r.stdout) == TRL_PINS:
            return python
    print(f"setting up {TRL_VENV} ({TRL_PINS}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pins = [f"{k}=={v}" for k, v in TRL_PINS.items()]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    return python


def legacy_model_copy(model_dir: Path, out: Path) -> Path:
    """A copy transformers 4.57 can read: the same weights, config with rope_theta, a fast-tokenizer config."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "model.safetensors", out / "model.safetensors")
    shutil.copy(model_dir / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["torch_dtype"] = config.pop("dtype", "float32")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    legacy = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tok_cfg.get("model_max_length", 8192)}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if tok_cfg.get(key) is not None:
            legacy[key] = tok_cfg[key]
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        legacy["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(legacy, indent=1))
    return out


TRL_RUNNER = r'''
import json, resource, statistics, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
import trl.experimental.ppo.ppo_trainer as ppo_mod
from trl.experimental.ppo import PPOConfig, PPOTrainer

spec = json.loads(sys.argv[1])
model_dir, n_iter = spec["model_dir"], spec["warmup"] + spec["iters"]
tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
policy = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
torch.manual_seed(0)
value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, torch_dtype=torch.float32)
torch.manual_seed(0)
reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, torch_dtype=torch.float32)
for m in (policy, ref, value, reward):
    m.config.pad_token_id = tok.pad_token_id
data = Dataset.from_dict({"input_ids": spec["prompt_ids"] * n_iter})

gen_times = []
original = ppo_mod.batch_generation
def timed_generation(*a, **k):
    t0 = time.perf_counter(); out = original(*a, **k); gen_times.append(time.perf_counter() - t0); return out
ppo_mod.batch_generation = timed_generation

class Clock(TrainerCallback):
    def __init__(self): self.ends = [time.perf_counter()]
    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())
        i = len(self.ends) - 2
        print(f"  trl iteration {i}: {self.ends[-1] - self.ends[-2]:.2f}s (generation {gen_times[-1]:.2f})", flush=True)

n = len(spec["prompt_ids"])
cfg = PPOConfig(output_dir=spec["out_dir"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
                num_mini_batches=1, num_ppo_epochs=1, response_length=spec["new_tokens"], temperature=0.7,
                total_episodes=n * n_iter, local_rollout_forward_batch_size=n, learning_rate=1e-6,
                num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0)
clock = Clock()
trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     value_model=value, train_dataset=data, callbacks=[clock])
clock.ends = [time.perf_counter()]
trainer.train()
steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])][spec["warmup"]:]
gens = gen_times[spec["warmup"]:]
rest = [s - g for s, g in zip(steps, gens)]
print("RESULT " + json.dumps({"side": "trl", "dtype": str(policy.dtype).removeprefix("torch."),
      "seconds_per_iteration": statistics.median(steps),
      "generation_s": statistics.median(gens), "experience_plus_training_s": statistics.median(rest),
      "tokens_generated": n * spec["new_tokens"],
      "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "threads": torch.get_num_threads(), "iterations": steps}))
'''


def run_trl(args, work: Path) -> dict:
    python = ensure_trl_venv()
    from rlhfkit.data.prepare import load_phase, prepare

    inputs = json.loads((work / "inputs.json").read_text())
    cfg = rlhfkit_config(args, work, inputs, "fp32")
    prepare(cfg, show_progress=False)
    (_, table), = load_phase(cfg.output_dir / "data", 3, "train")
    prompt_ids = [table.row(i)["prompt_ids"].tolist() for i in range(len(table))]
    model = legacy_model_copy(Path(inputs["model_dir"]), work / "legacy-model")
    spec = {"model_dir": str(model), "prompt_ids": prompt_ids, "warmup": args.warmup, "iters": args.iters,
            "new_tokens": args.new_tokens, "out_dir": str(work / "trl-out")}
    runner = work / "trl_runner.py"
    runner.write_text(TRL_RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    p = subprocess.run([str(python), str(runner), json.dumps(spec)], env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("  "):
            print(line, flush=True)
    results = [json.loads(line[len(RESULT):]) for line in p.stdout.splitlines() if line.startswith(RESULT)]
    if p.returncode != 0 or not results:
        raise SystemExit(f"TRL run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return results[0]


# --- driver -----------------------------------------------------------------------------------------
def main() -> None:
    from rlhfkit.engine.precision import machine_summary

    args = parse_args()
    if args.worker:
        work = Path(args.work_dir)
        result = run_trl(args, work) if args.worker == "trl" else worker_rlhfkit(args, work, args.worker)
        result["machine"] = machine_summary()  # what this side's process saw (threads, bf16, environment)
        print(RESULT + json.dumps(result), flush=True)
        return
    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    sides = choose_sides(args.sides)
    args.sides = ",".join(sides)  # the results record the sides that ran
    work = Path(tempfile.mkdtemp(prefix="ppo-iteration-"))
    try:
        (work / "inputs.json").write_text(json.dumps(prepare_inputs(args, work)))
        results = []
        for side in sides:
            cmd = [sys.executable, __file__, "--worker", side, "--work-dir", str(work), "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens), "--model", args.model]
            print(f"{side} ({SIDE_DTYPE[side]}):", flush=True)
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out_lines = []
            for line in p.stdout:
                out_lines.append(line)
                if line.startswith("  "):
                    print(line, end="", flush=True)
            err = p.stderr.read()
            p.wait()
            found = [json.loads(x[len(RESULT):]) for x in out_lines if x.startswith(RESULT)]
            if p.returncode != 0 or not found:
                raise SystemExit(f"{side} failed:\n{''.join(out_lines)[-3000:]}\n{err[-5000:]}")
            results.append(found[0])
        report(results, args, machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose_sides(asked: str | None) -> list[str]:
    """The sides asked for, else the default less its bf16 sides where bf16 is not native: there bf16 runs
    a slow fallback (tens of times slower than fp32), no figure to judge rlhfkit by."""
    from rlhfkit.engine.precision import native_bf16, why_auto

    if asked:
        sides = asked.split(",")
        unknown = [s for s in sides if s not in SIDE_DTYPE]
        if unknown:
            raise SystemExit(f"unknown sides {unknown}; choose from {', '.join(SIDE_DTYPE)}")
        return sides
    if native_bf16():
        return DEFAULT_SIDES
    print(f"note: {why_auto()}: bf16 sides left out of the default (ask for them with --sides)", flush=True)
    return [s for s in DEFAULT_SIDES if SIDE_DTYPE[s] != "bfloat16"]


def report(results: list[dict], args, machine: str) -> None:
    print(f"\nreference PPO iteration: {args.model}, {args.prompts} prompts ≤ {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, 1 epoch, 1 mini-batch; median of {args.iters} after {args.warmup} warm-up")
    print(f"machine: {machine}")
    for r in results:
        if r["machine"] != machine:
            print(f"  {r['side']} worker saw: {r['machine']}")
    print(f"{'side':<14} {'dtype':<8} {'s/iter':>7} {'generation':>11} {'experience':>11} {'training':>9} "
          f"{'tokens':>7} {'peak GB':>8}")
    for r in results:
        exp = r.get("experience_s")
        train = r.get("training_s")
        rest = f"{'(exp+train)':>11} {r['experience_plus_training_s']:>9.2f}" if exp is None else f"{exp:>11.2f} {train:>9.2f}"
        print(f"{r['side']:<14} {r['dtype']:<8} {r['seconds_per_iteration']:>7.2f} {r['generation_s']:>11.2f} {rest} "
              f"{int(r['tokens_generated']):>7} {r['peak_memory_gb']:>8.2f}")
    trl = next((r for r in results if r["side"] == "trl"), None)
    if trl:
        print("speed-up over TRL 0.28 (TRL s/iter ÷ rlhfkit s/iter, > 1: rlhfkit faster):")
        for r in results:
            if r is trl:
                continue
            ratio = trl["seconds_per_iteration"] / r["seconds_per_iteration"]
            if r["dtype"] == trl["dtype"]:
                print(f"  {r['side']} vs TRL {SHORT[trl['dtype']]}: {ratio:.2f}x")
            else:
                print(f"  {r['side']} ({SHORT[r['dtype']]}) vs TRL ({SHORT[trl['dtype']]}), "
                      f"different precision: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "results": results}, indent=1))
    print(f"results → {out}")


if __name__ == "__main__":
    main()

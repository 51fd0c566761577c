"""One GRPO iteration, rlhfkit against TRL's GRPOTrainer (the current PyPI release), in one run.

    .venv/bin/python benchmarks/grpo_vs_trl.py                      # both sides, beta 0 (no reference model)
    .venv/bin/python benchmarks/grpo_vs_trl.py --beta 0.04          # both sides with a k3 KL loss and a reference
    .venv/bin/python benchmarks/grpo_vs_trl.py --sides trl --iters 2  # one side only
    .venv/bin/python benchmarks/grpo_vs_trl.py --tools calculator --max-turns 3   # multi-turn episodes with a tool

The iteration (the same on both sides)
* SmolLM2-135M-Instruct (rlhfkit's built-in GGUF, converted once to a HF directory in rlhfkit's model cache;
  both sides load that same directory), everything fp32 on CPU, full fine-tuning.
* 8 GSM8K questions (the first 8 of ../shared/data/sft/gsm8k_train.jsonl.gz) as one user turn each, rendered
  with the tokenizer's chat template (rlhfkit's data pipeline; TRL renders the same conversation itself; the
  TRL side checks that its token ids equal rlhfkit's, and stops if they do not).
* 4 samples per prompt (32 responses), at most 64 new tokens, temperature 1.0, no top-k / top-p. Both sides
  stop a response at EOS (<|im_end|>), so the work depends on the lengths sampled: the mean generated length of
  each side is printed next to its time.
* Reward: gsm8k_reward below, the same Python function on both sides (rlhfkit: a `python` reward source;
  TRL: a reward function). 1 if the last number of the response equals the reference answer, + 0.2 if the
  response ends in GSM8K's "#### <number>" line. The reference answer is found from the question in the prompt.
* Advantages: (r − group mean) / group std (rlhfkit ppo.advantage grpo; TRL scale_rewards="group").
* Loss: clipped ratio (ε 0.2), aggregated as the mean over responses of each one's token mean (rlhfkit
  loss_aggregation seq_mean_token_mean; TRL loss_type "grpo").
* KL: --beta (default 0.0: no KL, and TRL loads no reference model; rlhfkit kl_mode off). With --beta > 0 both
  add beta·k3 KL to the loss (rlhfkit kl_mode loss, kl_coef beta; TRL beta) against a reference model.
* One optimizer step on all 32 responses per iteration: micro-batches of --micro-batch (8) responses with
  gradient accumulation (rlhfkit actor.micro_batch_size 8, mini-batch = all 32; TRL per_device_train_batch_size
  8, gradient_accumulation_steps 4, steps_per_generation 4: the 32 are generated together). AdamW, lr 1e-6,
  betas (0.9, 0.95), no weight decay, constant schedule, grad-norm clip 1.0, no gradient checkpointing.
  One PPO epoch (TRL num_iterations 1); both sides take the old log-probs from the current policy without an
  extra forward (rlhfkit reuses the sampler's log-probs; TRL detaches the training forward's).
* Seconds per iteration: --iters iterations after --warmup warm-up iterations, each side in its own process
  (rlhfkit: PPOTrainer.step(i)'s time/step; TRL: the time between on_step_end callbacks). Generation time is
  reported separately (rlhfkit: time/generation; TRL: its _generate method, wrapped).
* Ratio: TRL s/iter ÷ rlhfkit s/iter (> 1: rlhfkit faster).

Multi-turn episodes (--tools calculator --max-turns 3): the same iteration, each response an episode in which
the model may call the tools between its turns.
* The tools: rlhfkit's built-ins, the same Python functions on both sides (rlhfkit: ppo.tools; TRL: `tools=`,
  imported from this checkout's src/rlhfkit/agents/builtin_tools.py, which needs only the standard library).
* The prompt: SmolLM2's template takes no tools, so both describe them in the system message: rlhfkit's
  instructions (agents/calls.tool_instructions) in place of the template's default system message, as rlhfkit
  does for such templates. TRL gets that system message in its conversations, and the TRL side checks that its
  prompt ids (rendered with `tools=`) equal rlhfkit's described ones.
* The call format: the Hermes/Qwen one on both sides (<tool_call>{"name": ..., "arguments": {...}}</tool_call>).
  TRL 1.16 needs a chat template that renders an assistant message's `tool_calls` (supports_tool_calling) and a
  response parser (`response_template`): the TRL side uses SmolLM2's own template with a `tool_calls` branch added
  (the rendering of system, user, assistant and tool messages unchanged) and TRL's parser for Qwen3's template,
  which reads that format and ends a turn at <|im_end|>.
* Turns and lengths: at most --max-turns model turns (TRL max_tool_calling_iterations = max_turns − 1), each at
  most --new-tokens (TRL generation_kwargs max_new_tokens), at most --episode-tokens new tokens per episode after
  the prompt, the model's and the tools' together (rlhfkit max_episode_tokens; TRL max_completion_length, which
  counts the same tokens). Loss, KL and lengths cover the model's own tokens on both sides.
* Reported per side beside the times: model turns, tool calls and valid calls per episode, the model's tokens
  and all tokens (the model's and the tools') per episode. The two count calls differently: a <tool_call> block
  that does not parse is a call answered with an error on rlhfkit's side, and plain text that ends the episode
  on TRL's (its parse_response falls back to text).
* What differs by design: a failing call's message (rlhfkit: "Error: calculator raised ValueError: ...", after
  checking the arguments against the schema; TRL: "{'error': '...'}"), and how calls run (rlhfkit: all of a
  turn's calls in threads under one deadline, --tool-timeout; TRL: one after another, without a deadline).

TRL runs in its own virtualenv (--trl-venv, default /work/.trl-grpo-venv), created on first use with
`python3 -m venv` and `pip install -c <constraints pinning torch==2.13.0> trl`, so that pip keeps the CPU torch
(2.13.0, the one rlhfkit uses) instead of pulling a CUDA build. Its transformers is whatever TRL resolves to;
the versions of trl, transformers and torch on each side are printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHFKIT_SHARED", REPO.parent / "shared"))
GSM8K = SHARED / "data" / "sft" / "gsm8k_train.jsonl.gz"
TRL_VENV = Path("/work/.trl-grpo-venv")
TORCH_PIN = "torch==2.13.0"
RESULT = "RESULT "
ANSWERS_ENV = "GRPO_BENCH_ANSWERS"  # a JSON file {question: final answer}, written by the driver
BUILTIN_TOOLS = ("calculator", "python")  # rlhfkit's built-ins: the TRL side imports them from src/


# --- the reward (the same function on both sides; stdlib only, TRL's venv imports it too) -------------------
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")
_FORMAT = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")
_answers: dict[str, str] | None = None


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def gsm8k_reward(prompts, responses, metadata=None):
    """1 if the response's last number equals the reference answer, + 0.2 for a final "#### <number>" line.
    The reference answer is that of the question the prompt contains (prompts may be rendered text or a
    list of chat messages)."""
    global _answers
    if _answers is None:
        _answers = json.loads(Path(os.environ[ANSWERS_ENV]).read_text())
    out = []
    for prompt, response in zip(prompts, responses):
        if isinstance(prompt, list):  # TRL's conversational prompts / completions
            prompt = "\n".join(m["content"] for m in prompt)
        if isinstance(response, list):
            response = "\n".join(m["content"] for m in response)
        answer = next((a for q, a in _answers.items() if q in prompt), None)
        value = _number(response)
        correct = answer is not None and value is not None and abs(value - float(answer.replace(",", ""))) < 1e-6
        out.append(float(correct) + 0.2 * bool(_FORMAT.search(response.strip())))
    return out


# --- episodes (with --tools; both sides print these per iteration) ---------------------------------------------
EPISODE_KEYS = ("turns", "calls", "valid_calls", "episode_tokens")  # per episode, one value per iteration


def episode_note(e: dict) -> str:
    """The per-iteration line's episode part: model turns, calls (valid ones) and all tokens per episode."""
    return (f", turns {e['turns']:.2f}, calls {e['calls']:.2f} ({e['valid_calls']:.2f} valid), "
            f"episode tokens {e['episode_tokens']:.1f}")


# --- arguments, machine --------------------------------------------------------------------------------------
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sides", default="rlhfkit,trl")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient on both sides (0: no reference model)")
    ap.add_argument("--tools", default="", help=f"comma-separated built-in tools ({', '.join(BUILTIN_TOOLS)}): "
                    "multi-turn episodes; none: single-turn responses")
    ap.add_argument("--max-turns", type=int, default=None, help="model turns per episode (with --tools; default 3)")
    ap.add_argument("--episode-tokens", type=int, default=None, help="new tokens per episode, the model's and the "
                    "tools' (with --tools; default 2 x max-turns x new-tokens, rlhfkit's default)")
    ap.add_argument("--tool-timeout", type=float, default=None, help="rlhfkit's deadline for a turn's tool calls "
                    "(with --tools; default 10 s; TRL has none for plain functions)")
    ap.add_argument("--trl-venv", default=str(TRL_VENV))
    ap.add_argument("--out", default="", help="results JSON; default benchmarks/results/grpo_vs_trl[_tools].json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tools = ",".join(t.strip() for t in args.tools.split(",") if t.strip())
    unknown = [t for t in tool_names(args) if t not in BUILTIN_TOOLS]
    if unknown:
        ap.error(f"--tools: {', '.join(unknown)} is not a built-in tool ({', '.join(BUILTIN_TOOLS)})")
    episode_flags = {"--max-turns": args.max_turns, "--episode-tokens": args.episode_tokens,
                     "--tool-timeout": args.tool_timeout}
    if not args.tools and any(v is not None for v in episode_flags.values()):
        ap.error(f"{', '.join(k for k, v in episode_flags.items() if v is not None)}: episodes need --tools")
    if args.tools:
        args.max_turns = 3 if args.max_turns is None else args.max_turns
        if args.max_turns < 2:
            ap.error("--max-turns: a tool's result is read in a next turn, so --tools needs 2 or more")
        args.episode_tokens = args.episode_tokens or 2 * args.max_turns * args.new_tokens
        args.tool_timeout = 10.0 if args.tool_timeout is None else args.tool_timeout
    if not args.out:
        suffix = "_tools" if args.tools else ""
        args.out = str(REPO / "benchmarks" / "results" / f"grpo_vs_trl{suffix}.json")
    return args


def tool_names(args) -> list[str]:
    return args.tools.split(",") if args.tools else []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- shared inputs -------------------------------------------------------------------------------------------
def prepare_inputs(args, work: Path) -> dict:
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.prepare import load_phase, prepare
    from rlhfkit.models.loading import resolve_model_dir

    records = []
    with gzip.open(GSM8K, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            records.append({"id": r["id"], "prompt": r["prompt"], "response": r["response"],
                            "final_answer": r["final_answer"]})
            if len(records) == args.prompts:
                break
    data_file = work / "gsm8k.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = work / "answers.json"
    answers.write_text(json.dumps({r["prompt"]: r["final_answer"] for r in records}))
    model_dir = resolve_model_dir(args.model, ModelConfig(name_or_path=args.model))
    inputs = {"model_dir": str(model_dir), "data_file": str(data_file), "answers": str(answers)}
    # the prompts' token ids as rlhfkit's data pipeline renders them, in the file's order (TRL must match)
    cfg = rlhfkit_config(args, work, inputs)
    prepare(cfg, show_progress=False)
    (_, table), = load_phase(cfg.output_dir / "data", 3, "train")
    by_text = {}
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.models.configs import model_config_for
    tok = load_tokenizer(model_config_for(cfg, inputs["model_dir"]))
    for i in range(len(table)):
        ids = table.row(i)["prompt_ids"].tolist()
        text = tok.decode(ids)
        q = next(r["prompt"] for r in records if r["prompt"] in text)
        by_text[q] = ids
    inputs["questions"] = [r["prompt"] for r in records]
    inputs["prompt_ids"] = [by_text[r["prompt"]] for r in records]
    if args.tools:
        inputs.update(described_prompts(tok, tool_names(args), inputs["prompt_ids"]))
    return inputs


def described_prompts(tok, names: list[str], prompt_ids: list[list[int]]) -> dict:
    """The prompts as rlhfkit's episodes start from them (the tools described in the system message, SmolLM2's
    template taking no tools), and that system message's text, which the TRL side puts in its conversations."""
    from rlhfkit.agents.calls import template_takes_tools, tool_instructions
    from rlhfkit.agents.episode import EpisodeTemplate
    from rlhfkit.agents.tools import load_tools

    if template_takes_tools(tok):
        raise SystemExit("--tools: this model's chat template takes tools=; the benchmark describes them in the "
                         "system message on both sides, which is only what rlhfkit does for templates without")
    schemas = [t.schema for t in load_tools(names, "--tools").values()]
    template = EpisodeTemplate(tok, schemas, None, [tok.eos_token_id])
    return {"system_message": tool_instructions(schemas), "prompt_ids": [template.prompt(ids) for ids in prompt_ids]}


def rlhfkit_config(args, work: Path, inputs: dict):
    from rlhfkit.config import Config

    prompt_len = 256
    ppo = {"actor_model": inputs["model_dir"], "advantage": "grpo", "n_samples_per_prompt": args.generations,
           "rollout_batch_size": args.prompts, "ppo_epochs": 1, "loss_aggregation": "seq_mean_token_mean",
           "reward": {"sources": [{"type": "python", "function": f"{Path(__file__).resolve()}:gsm8k_reward"}]},
           "sampling": {"max_new_tokens": args.new_tokens, "temperature": args.temperature},
           "rollout_dtype": "float32", "cliprange": 0.2,
           "actor": {"dtype": "float32", "micro_batch_size": args.micro_batch, "learning_rate": args.lr,
                     "lr_scheduler": "constant", "adam_betas": [0.9, 0.95], "weight_decay": 0.0,
                     "max_grad_norm": 1.0, "gradient_checkpointing": False},
           "steps": args.warmup + args.iters}
    if args.tools:
        ppo.update({"tools": tool_names(args), "max_turns": args.max_turns, "max_episode_tokens": args.episode_tokens,
                    "tool_timeout_s": args.tool_timeout})
    if args.beta > 0:
        ppo.update({"kl_mode": "loss", "kl_coef": args.beta, "kl_estimator": "k3", "reference": {"dtype": "float32"}})
    else:
        ppo.update({"kl_mode": "off"})
    raw = {
        "run": {"output_dir": str(work / "run-rlhfkit")},
        "model": {"name_or_path": inputs["model_dir"]},
        "data": {"datasets": [{"name": "gsm8k", "path": inputs["data_file"], "format": "sft", "phases": [3],
                               "eval_path": inputs["data_file"]}],  # an eval split of its own: none carved
                 "cache_dir": str(work / "cache"), "max_prompt_len": prompt_len,
                 "max_seq_len": prompt_len + args.new_tokens},
        "ppo": ppo,
    }
    return Config.model_validate(raw)


# --- rlhfkit side --------------------------------------------------------------------------------------------
def worker_rlhfkit(args, work: Path) -> dict:
    import importlib.metadata as md

    import torch

    from rlhfkit.train.ppo.trainer import PPOTrainer

    inputs = json.loads((work / "inputs.json").read_text())
    trainer = PPOTrainer(rlhfkit_config(args, work, inputs), show_progress=False)
    n_resp = args.prompts * args.generations
    steps = []
    for step in range(args.warmup + args.iters):
        m = trainer.step(step)
        mean_len = m["tokens/generated"] / n_resp
        reward = next((v for k, v in m.items() if k.startswith("reward/") and isinstance(v, float)), float("nan"))
        episode = {"turns": m["episode/turns"], "calls": m["tools/calls_per_episode"],
                   "valid_calls": m["tools/valid_calls_per_episode"], "episode_tokens": m["episode/tokens"]
                   } if args.tools else {}
        note = episode_note(episode) if args.tools else ""
        print(f"  rlhfkit iteration {step}: {m['time/step']:.2f}s (generation {m['time/generation']:.2f}, "
              f"experience {m['time/experience']:.2f}, training {m['time/training']:.2f}), "
              f"mean length {mean_len:.1f}, reward {reward:.3f}{note}", flush=True)
        if step >= args.warmup:
            steps.append({"s": m["time/step"], "gen": m["time/generation"], "len": mean_len, **episode})
    return {"side": "rlhfkit", "version": md.version("rlhfkit"),
            "dtype": trainer.actor_t.dtype, "rollout_dtype": str(trainer.policy.model.dtype).removeprefix("torch."),
            "old_logprobs_from_rollout": trainer.reuse_logprobs,
            "versions": {"torch": torch.__version__, "transformers": md.version("transformers")},
            "iterations": [s["s"] for s in steps], "generation_s": [s["gen"] for s in steps],
            "mean_length": [s["len"] for s in steps], "threads": torch.get_num_threads(),
            **({k: [s[k] for s in steps] for k in EPISODE_KEYS} if args.tools else {})}


# --- TRL side ------------------------------------------------------------------------------------------------
def ensure_trl_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        r = subprocess.run([str(python), "-c", "import trl, torch"], capture_output=True, text=True)
        if r.returncode == 0:
            return python
    print(f"setting up {venv} (trl, {TORCH_PIN}) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints), "trl", TORCH_PIN],
                   check=True)
    return python


def run_trl(args, work: Path) -> dict:
    python = ensure_trl_venv(Path(args.trl_venv))
    inputs = json.loads((work / "inputs.json").read_text())
    spec = {"model_dir": inputs["model_dir"], "questions": inputs["questions"], "prompt_ids": inputs["prompt_ids"],
            "reward_file": str(Path(__file__).resolve()), "out_dir": str(work / "trl-out"),
            "warmup": args.warmup, "iters": args.iters, "generations": args.generations,
            "new_tokens": args.new_tokens, "micro_batch": args.micro_batch, "temperature": args.temperature,
            "lr": args.lr, "beta": args.beta, "tools": tool_names(args), "max_turns": args.max_turns,
            "episode_tokens": args.episode_tokens, "system_message": inputs.get("system_message"),
            "rlhfkit_src": str(REPO / "src")}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    runner = Path(__file__).resolve().parent / "trl_grpo_side.py"
    p = subprocess.Popen([str(python), str(runner), json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("  "):
            print(line, end="", flush=True)
    err = p.stderr.read()
    p.wait()
    found = [json.loads(x[len(RESULT):]) for x in lines if x.startswith(RESULT)]
    if p.returncode != 0 or not found:
        raise SystemExit(f"TRL run failed:\n{''.join(lines)[-3000:]}\n{err[-6000:]}")
    return found[0]


# --- driver --------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    if args.worker:
        work = Path(args.work_dir)
        os.environ[ANSWERS_ENV] = json.loads((work / "inputs.json").read_text())["answers"]
        result = run_trl(args, work) if args.worker == "trl" else worker_rlhfkit(args, work)
        print(RESULT + json.dumps(result), flush=True)
        return
    from rlhfkit.engine.precision import machine_summary

    machine = machine_summary()
    print(f"CPU: {cpu_model()}; machine: {machine}", flush=True)
    sides = args.sides.split(",")
    work = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))
    try:
        (work / "inputs.json").write_text(json.dumps(prepare_inputs(args, work)))
        results = []
        for side in sides:
            cmd = [sys.executable, __file__, "--worker", side, "--work-dir", str(work)] + [
                a for k, v in vars(args).items() if k not in ("worker", "work_dir", "out", "sides") and v is not None
                for a in (f"--{k.replace('_', '-')}", str(v))]
            print(f"{side}:", flush=True)
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out_lines = []
            for line in p.stdout:
                out_lines.append(line)
                if line.startswith("  ") or line.startswith("setting up"):
                    print(line, end="", flush=True)
            err = p.stderr.read()
            p.wait()
            found = [json.loads(x[len(RESULT):]) for x in out_lines if x.startswith(RESULT)]
            if p.returncode != 0 or not found:
                raise SystemExit(f"{side} failed:\n{''.join(out_lines)[-3000:]}\n{err[-6000:]}")
            results.append(found[0])
        report(results, args, machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: list[dict], args, machine: str) -> None:
    kl = f"beta {args.beta} (k3 KL loss, reference model)" if args.beta > 0 else "beta 0 (no KL, no reference model)"
    length = (f"episodes with {args.tools}: ≤ {args.max_turns} model turns of ≤ {args.new_tokens} new tokens, "
              f"≤ {args.episode_tokens} new tokens per episode (the model's and the tools')" if args.tools else
              f"≤ {args.new_tokens} new tokens")
    print(f"\nGRPO iteration: {args.model}, {args.prompts} GSM8K prompts x {args.generations} samples, "
          f"{length} (EOS stops), temperature {args.temperature}, {kl}, lr {args.lr}, "
          f"one optimizer step on {args.prompts * args.generations} responses (micro-batch {args.micro_batch}); "
          f"{args.iters} iterations after {args.warmup} warm-up")
    print(f"CPU: {cpu_model()}, {results[0].get('threads')} torch threads; precision: fp32 on both sides")
    print(f"{'side':<8} {'version':<10} {'s/iter':>7} {'each':<16} {'gen s':>6} {'mean gen tokens':>15}  "
          f"{'torch':<12} transformers")
    for r in results:
        each = ", ".join(f"{s:.2f}" for s in r["iterations"])
        print(f"{r['side']:<8} {r['version']:<10} {statistics.mean(r['iterations']):>7.2f} {each:<16} "
              f"{statistics.mean(r['generation_s']):>6.2f} {statistics.mean(r['mean_length']):>15.1f}  "
              f"{r['versions']['torch']:<12} {r['versions']['transformers']}")
    if args.tools:
        print(f"{'side':<8} {'turns/ep':>8} {'calls/ep':>8} {'valid/ep':>8} {'episode tokens':>14}  (per episode, "
              "mean over the timed iterations; episode tokens: the model's and the tools')")
        for r in results:
            print(f"{r['side']:<8} " + " ".join(f"{statistics.mean(r[k]):>{w}.2f}" for k, w in
                                              zip(EPISODE_KEYS, (8, 8, 8, 14))))
    by = {r["side"]: r for r in results}
    if "rlhfkit" in by:
        r = by["rlhfkit"]
        print(f"rlhfkit: actor {r['dtype']}, rollouts {r['rollout_dtype']}, old log-probs from the rollout: "
              f"{r['old_logprobs_from_rollout']}")
    if "trl" in by and "rlhfkit" in by:
        ratio = statistics.mean(by["trl"]["iterations"]) / statistics.mean(by["rlhfkit"]["iterations"])
        print(f"ratio TRL/rlhfkit (s/iter): {ratio:.2f}x (> 1: rlhfkit faster)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpu": cpu_model(), "machine": machine, "results": results},
                              indent=1))
    print(f"results → {out}")


if __name__ == "__main__":
    main()

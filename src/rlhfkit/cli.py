"""rlhfkit command line: `rlhfkit <stage> [<verb>] CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time

from .errors import ConfigError, RlhfkitError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_seq_len=256")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def _positive(kind):
    """An argparse type: a number of `kind` above 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def cmd_data_prepare(args) -> None:
    from .config import load_config
    from .data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    manifest = prepare(cfg, show_progress=not args.no_progress)
    took = time.perf_counter() - start
    counts = {p: {s: sum(e["records"] for e in es) for s, es in splits.items()} for p, splits in manifest["phases"].items()}
    print(f"prepared {cfg.output_dir / 'data'} in {took:.1f}s "
          f"(cache: {manifest['cache_hits']} hit, {manifest['cache_misses']} built)")
    for phase, c in counts.items():
        print(f"  phase {phase}: train {c['train']}, eval {c['eval']}")


def cmd_data_inspect(args) -> None:
    from .config import load_config
    from .data.inspect import format_report
    from .data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg, show_progress=not args.no_progress)  # a cache hit when `data prepare` already ran
    print(format_report(cfg.output_dir / "data", examples=not args.no_examples))


def cmd_train_stage(args) -> None:
    from .config import load_config
    from .train.dpo import run_dpo
    from .train.ppo.trainer import run_ppo
    from .train.reward import run_rm
    from .train.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    runner = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "ppo": run_ppo}[args.stage]
    start = time.perf_counter()
    final = runner(cfg, show_progress=not args.no_progress)
    from .engine.distributed import is_main

    if is_main():
        shown = "  ".join(f"{k}={v:.4g}" for k, v in final.items())
        print(f"{args.stage}: done in {time.perf_counter() - start:.1f}s → {cfg.output_dir / args.stage / 'final'}  {shown}")


def cmd_pipeline(args) -> None:
    from .config import load_config
    from .pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    record = run_pipeline(cfg, args.from_stage, show_progress=not args.no_progress)
    from .engine.distributed import is_main

    if is_main():
        shown = ", ".join(f"{k} {v:.0f}s" for k, v in record["seconds"].items())
        print(f"pipeline: done in {time.perf_counter() - start:.0f}s ({shown}) → {cfg.output_dir}")


def cmd_eval(args) -> None:
    from .config import load_config
    from .pipeline import evaluate_and_report

    evaluate_and_report(load_config(args.config, args.overrides), show_progress=not args.no_progress)


def cmd_export(args) -> None:
    from .config import load_config
    from .pipeline import export_run

    export_run(load_config(args.config, args.overrides), args.model)


def cmd_report(args) -> None:
    from .config import load_config
    from .eval.report import build_report

    print(build_report(load_config(args.config, args.overrides).output_dir))


def cmd_chat(args) -> None:
    from .agents.tools import load_tools
    from .chat import chat, load_chat_model

    tools = None
    if args.tools is not None:  # loaded first: a bad tool is a message before the model loads
        tools = load_tools(args.tools.split(","), "--tools")
    elif args.max_turns is not None or args.tool_timeout is not None:
        raise ConfigError(f"{'--max-turns' if args.max_turns is not None else '--tool-timeout'} is set, but there are "
                          "no --tools to use it")
    try:
        model, tok = load_chat_model(args.model_dir, args.dtype)
    except (FileNotFoundError, OSError) as e:
        raise RlhfkitError(str(e)) from None
    chat(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature, system=args.system,
         seed=args.seed, tools=tools, max_turns=args.max_turns or 5, tool_timeout=args.tool_timeout or 10.0)


def cmd_serve_reward(args) -> None:
    from .rewards.server import serve

    serve(args.rm_dir, host=args.host, port=args.port, batch_size=args.batch_size,
          max_request_bytes=args.max_request_bytes, dtype=args.dtype, max_length=args.max_length)


def cmd_config_show(args) -> None:
    from .config import load_config
    from .config_tools import show_config

    print(show_config(load_config(args.config, args.overrides), changed=args.changed), end="")


def cmd_config_check(args) -> None:
    from .config import load_config
    from .config_tools import batch_summary, check_config, plural

    cfg = load_config(args.config, args.overrides)
    problems = check_config(cfg, args.world_size)
    at = plural(args.world_size, "process", "processes")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{args.config} at {at}: {plural(len(problems), 'problem')}\n{listed}")
    for line in batch_summary(cfg, args.world_size):
        print(f"  {line}")
    print(f"ok: {args.config} at {at}")


def cmd_model_fetch(args) -> None:
    from .config import ModelConfig
    from .models.loading import resolve_model_dir

    print(resolve_model_dir(args.name, ModelConfig(name_or_path=args.name)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    stages = parser.add_subparsers(dest="stage", required=True)

    data = stages.add_parser("data", help="prepare and inspect the three-phase data").add_subparsers(dest="verb", required=True)
    p = data.add_parser("prepare", help="read, split, tokenize and cache every dataset of the config")
    _config_args(p)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("inspect", help="per dataset and phase: counts, drops, token lengths, examples")
    _config_args(p)
    p.add_argument("--no-examples", action="store_true", help="leave out the rendered examples")
    p.set_defaults(func=cmd_data_inspect)

    helps = {"sft": "supervised fine-tuning on phase-1 data",
             "rm": "reward model (Bradley–Terry) on phase-2 pairs",
             "dpo": "DPO on phase-2 pairs (instead of RM + PPO)",
             "ppo": "RL on phase-3 prompts (PPO, GRPO, RLOO, REINFORCE++): actor from SFT, rewards from ppo.reward.sources"}
    for name, text in helps.items():
        p = stages.add_parser(name, help=text)
        _config_args(p)
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by some launchers
        p.set_defaults(func=cmd_train_stage)

    p = stages.add_parser("pipeline", help="data → sft → rm → ppo (or dpo) → eval → export; skips finished stages")
    _config_args(p)
    p.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on (data, sft, rm, ppo, dpo, eval, export)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_pipeline)
    p = stages.add_parser("eval", help="final vs SFT on held-out prompts: RM score, win rate, KL, lengths; report.html")
    _config_args(p)
    p.set_defaults(func=cmd_eval)
    p = stages.add_parser("export", help="HF directory + GGUF (with a round-trip check) of the aligned model")
    _config_args(p)
    p.add_argument("--model", default=None, help="model dir to export (default: the aligned stage's final/)")
    p.set_defaults(func=cmd_export)
    p = stages.add_parser("report", help="rebuild <run>/report.html from the run's metrics and eval")
    _config_args(p)
    p.set_defaults(func=cmd_report)
    p = stages.add_parser("chat", help="multi-turn terminal chat with a model dir (/reset, /exit)")
    p.add_argument("model_dir")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 where the machine runs it natively, else fp32 (fp16 on older GPUs)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tools", default=None, help=(
        "comma-separated tools the model may call, as ppo.tools names them: calculator, python, "
        "package.module:function, path/to/file.py:function"))
    p.add_argument("--max-turns", type=_positive(int), default=None,
                   help="with --tools: most replies per message, tool calls included (default 5)")
    p.add_argument("--tool-timeout", type=_positive(float), default=None,
                   help="with --tools: seconds a reply's tool calls may take, all at once (default 10)")
    p.set_defaults(func=cmd_chat)

    p = stages.add_parser("serve-reward", help="serve a trained reward model over HTTP (OpenRLHF's remote RM protocol)")
    p.add_argument("rm_dir", help="the reward model directory, e.g. runs/NAME/rm/final")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=16, help="queries per forward pass")
    p.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger requests get 413")
    p.add_argument("--max-length", type=int, default=None, help="keep the last N tokens of each query")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_serve_reward)

    config = stages.add_parser("config", help="see and check a config without running anything").add_subparsers(
        dest="verb", required=True)
    p = config.add_parser("show", help="the resolved config as YAML, every default filled in, descriptions as comments")
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.advantage=grpo")
    p.add_argument("--changed", action="store_true", help="only the keys that differ from their defaults")
    p.set_defaults(func=cmd_config_show)
    p = config.add_parser("check", help="batch sizes against N processes, files, GGUF export: what the stages "
                                        "would reject, before they start")
    p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.rollout_batch_size=64")
    p.add_argument("--world-size", type=int, default=1, help="number of processes (GPUs) the run will use")
    p.set_defaults(func=cmd_config_check)

    model = stages.add_parser("model", help="model utilities").add_subparsers(dest="verb", required=True)
    p = model.add_parser("fetch", help="materialise a built-in model (e.g. convert the GGUF once) and print its dir")
    p.add_argument("name")
    p.set_defaults(func=cmd_model_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .engine.distributed import use_cpu_accelerator_without_gpu

    use_cpu_accelerator_without_gpu()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`CONFIG --no-progress a.b=1`)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # bitsandbytes warns on import that an optional hub kernel package is missing
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if getattr(args, "no_progress", False):
        silence_library_progress_bars()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        args.func(args)
    except RlhfkitError as e:
        print(f"rlhfkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhfkit: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("rlhfkit: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 143
    except Exception as e:
        from .engine.distributed import collective_failure

        lost = collective_failure(e, getattr(args, "stage", "rlhfkit"))
        if lost:
            print(f"rlhfkit: error: {lost}", file=sys.stderr)
            return 3
        backend = sys.modules.get("rlhfkit.engine.backend")  # loaded whenever a checkpoint can be in progress
        full = backend.checkpoint_write_failure(e) if backend is not None else None
        if full:  # e.g. torch's "[enforce fail at inline_container.cc] ... file write failed" while exporting
            print(f"rlhfkit: error: {full}", file=sys.stderr)
            return 2
        problem = machine_problem(e)
        if problem is None:
            raise
        print(f"rlhfkit: error: {problem}\nNothing half-written was published; fix that and rerun the same "
              "command (it resumes from the last complete checkpoint).", file=sys.stderr)
        return 2
    _leave_process_group()
    return 0


class Terminated(BaseException):
    """SIGTERM (a scheduler's kill, `kill PID`), raised where the program is, like Ctrl-C's KeyboardInterrupt:
    temp dirs are not published, and the rerun resumes from the last complete checkpoint."""


def _raise_terminated(signum, frame):
    raise Terminated()


# Not a bug of ours: the machine (disk full, quota, read-only or forbidden paths).
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def machine_problem(e: BaseException) -> str | None:
    """The machine's fault behind an exception, if it is one: an OSError with one of those errnos, or a
    library's own exception carrying its text (torch.save and safetensors wrap ENOSPC in theirs)."""
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e)
    for code in ENVIRONMENT_ERRNOS:
        if os.strerror(code) in text:
            return f"{os.strerror(code)} (while writing: {text.splitlines()[0][:300]})"
    return None


def silence_library_progress_bars() -> None:
    """--no-progress: also the bars transformers and huggingface_hub draw (e.g. "Loading weights")."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _leave_process_group() -> None:
    """After a multi-process run: sync, then exit without interpreter teardown, where gloo's threads
    occasionally abort a process that has already finished ("terminate called without an active exception")."""
    import torch.distributed as dist

    # A world of one has nothing to leave; destroying its group would also break a caller that runs main() in
    # its own process (the tests do) and keeps using DeepSpeed, whose cached groups point at the destroyed one.
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

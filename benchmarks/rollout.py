"""Rollout speed: rlhfkit's generation path, in each of its decoding loops, vs plain `model.generate` in
fp32, same prompts and lengths.

    .venv/bin/python benchmarks/rollout.py                       # SmolLM2-135M, batch 1 and 16, 64 new tokens
    .venv/bin/python benchmarks/rollout.py --model tiny-random --repeats 1   # quick check
    .venv/bin/python benchmarks/rollout.py --decodings dynamic,static        # without the compiled loop

Both sides sample (temperature 0.7) from the same left-padded real prompts (hh prompts from
../shared/data/ppo, left-truncated to --prompt-len tokens) and are forced to produce exactly
--new-tokens tokens per row (EOS is not a stop here), so both do the same amount of decoding work.

* plain: the fp32 model as loaded, `model.generate(do_sample=True, ...)` under torch.no_grad.
* rlhfkit <decoding>: what PPO uses for experience: the RolloutPolicy inference copy (weights copied from
  an fp32 training engine, at --rollout-dtype, dropout off, KV cache) and rlhfkit.engine.generation.generate
  with per-prompt seeds, once per decoding loop of ppo.rollout_decoding (--decodings): dynamic (a growing
  DynamicCache), static (a StaticCache of a bucketed length, fixed shapes) and compiled (static with the
  decode step under torch.compile: CUDA graphs on a GPU, inductor's C++ kernels on a CPU). --rollout-dtype
  defaults to auto, as ppo.rollout_dtype does: bf16 where it is native and fast (a GPU with bf16, a CPU
  whose bf16 matmul is measured faster), else fp32.

Prints the machine (CPU or GPU model, threads, torch's CPU capability, native bf16 or not, what `auto`
resolves to) and the resolved rollout dtype, then per batch size one row per side: tokens/s with the
precision it ran in (median of --repeats runs after one warm-up), the ratio to plain (two precisions unless
the rollout dtype is float32), the warm-up call's seconds (the compiled loop compiles then, once per batch
shape and length bucket) and whether the static loops sampled the same tokens as the dynamic one.

* llama.cpp <type>: where `llama_cpp` (llama-cpp-python) is importable, the same weights exported by
  `rlhfkit export`'s GGUF writer (--llamacpp-types, default f16), the same prompts, all rows decoded together in
  one llama.cpp context (benchmarks/llamacpp_decode.py), with as many threads as torch uses: the CPU anchor.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHFKIT_SHARED", REPO.parent / "shared"))


def real_prompts(tokenizer, n: int, prompt_len: int) -> list[np.ndarray]:
    from rlhfkit.data.records import parse_hh_transcript

    path = SHARED / "data" / "ppo" / "hh_prompts.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            turns = parse_hh_transcript(json.loads(line)["prompt"])
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            out.append(np.array(ids[-prompt_len:]))
            if len(out) == n:
                return out
    raise SystemExit(f"{path} has fewer than {n} prompts")


def timed(fn, repeats: int) -> tuple[float, float]:
    """Seconds of the first (warm-up) call and the median of `repeats` calls after it."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rollout-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="auto: bfloat16 where bf16 is native, else float32 (float16 on a GPU without bf16)")
    ap.add_argument("--llamacpp-types", default="f16", help="GGUF types timed in llama.cpp where it is importable")
    ap.add_argument("--decodings", default="dynamic,static,compiled",
                    help="rlhfkit's decoding loops to time (ppo.rollout_decoding values): dynamic, static, compiled")
    args = ap.parse_args()
    decodings = args.decodings.split(",")

    from rlhfkit.config import ModelConfig, TrainConfig
    from rlhfkit.engine.backend import TrainEngine, param_groups
    from rlhfkit.engine import distributed as D
    from rlhfkit.engine.generation import SamplingConfig, decoder_for, generate, pad_left, resolve_decoding
    from rlhfkit.engine.precision import DTYPES, machine_summary, resolve_dtype
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.train.common import TokenLogprobLM
    from rlhfkit.rollout.sampling import RolloutPolicy

    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    dtype = resolve_dtype(args.rollout_dtype, "--rollout-dtype")
    torch.manual_seed(0)
    mcfg = ModelConfig(name_or_path=args.model)
    tok = load_tokenizer(mcfg)
    plain = load_causal_lm(mcfg, dtype="float32").eval().to(D.device())  # where the rollout copy runs
    actor = TokenLogprobLM(load_causal_lm(mcfg, dtype="float32"))
    t = TrainConfig(micro_batch_size=1, dtype="float32")  # the copy starts from the same weights as plain's
    engine = TrainEngine(actor, t, 1, param_groups(actor, 1e-6, 0.0))
    policy = RolloutPolicy(engine, t, DTYPES[dtype], "dynamic")
    decoders = {d: decoder_for(policy.model, resolve_decoding(d), "--decodings") for d in decodings}
    no_stop = [plain.config.vocab_size]  # an id no model can emit: every row decodes exactly --new-tokens tokens
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7)

    print(f"model {args.model}, {args.new_tokens} new tokens, prompts ≤ {args.prompt_len} tokens, "
          f"torch threads {torch.get_num_threads()}, rollout dtype {dtype}"
          f"{' (auto)' if args.rollout_dtype == 'auto' else ''}")
    print(f"{'batch':>5} {'side':<18} {'dtype':>8} {'tok/s':>8} {'vs plain':>8} {'first call s':>12}  tokens")
    batches = [int(b) for b in args.batches.split(",")]
    llamacpp = llamacpp_decoders(mcfg, args, max(batches))
    for batch in batches:
        prompts = real_prompts(tok, batch, args.prompt_len)
        ids, lengths = pad_left(prompts, tok.pad_token_id)
        width = ids.shape[1]
        attention = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        ids, attention = ids.to(D.device()), attention.to(D.device())

        def run_plain():
            with torch.no_grad():
                out = plain.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=0.7,
                                     top_k=None, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=tok.pad_token_id)
            assert out.shape[1] - width == args.new_tokens

        tokens = batch * args.new_tokens
        first, plain_s = timed(run_plain, args.repeats)
        print(f"{batch:>5} {'plain generate':<18} {'float32':>8} {tokens / plain_s:>8.1f} {'':>8} {first:>12.1f}",
              flush=True)
        sampled = {}
        for decoding, static in decoders.items():
            def run_ours():
                g = generate(policy.model, prompts, tok.pad_token_id, no_stop, sampling, seeds=list(range(batch)),
                             static=static)
                assert int(g.response_lengths.min()) == args.new_tokens
                sampled[decoding] = g.response_ids

            first, ours_s = timed(run_ours, args.repeats)
            same = ""
            if decoding != "dynamic" and "dynamic" in sampled:
                differ = int((sampled[decoding] != sampled["dynamic"]).any(dim=1).sum())
                same = "as dynamic" if not differ else f"{differ} of {batch} rows differ from dynamic"
            print(f"{batch:>5} {'rlhfkit ' + decoding:<18} {dtype:>8} {tokens / ours_s:>8.1f} "
                  f"{plain_s / ours_s:>7.2f}x {first:>12.1f}  {same}", flush=True)
        for qtype, decoder in llamacpp.items():
            first, cpp_s = timed(lambda: decoder.generate(prompts, args.new_tokens, 0.7, seed=0), args.repeats)
            print(f"{batch:>5} {'llama.cpp ' + qtype:<18} {qtype:>8} {tokens / cpp_s:>8.1f} "
                  f"{plain_s / cpp_s:>7.2f}x {first:>12.1f}", flush=True)
    print(f"machine: {machine}")


def llamacpp_decoders(mcfg, args, max_batch: int) -> dict:
    """{GGUF type: LlamaCppDecoder} of the model's own GGUF export, or {} (said) where llama_cpp is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: llama_cpp is not importable (pip install llama-cpp-python): no llama.cpp rows")
        return {}
    import tempfile

    from llamacpp_decode import LlamaCppDecoder
    from rlhfkit.export import write_gguf
    from rlhfkit.models.loading import resolve_model_dir

    out = Path(tempfile.mkdtemp(prefix="rollout-gguf-"))
    decoders = {}
    for qtype in args.llamacpp_types.split(","):
        gguf = write_gguf(Path(resolve_model_dir(mcfg.name_or_path, mcfg)), out / f"model-{qtype}.gguf", qtype)
        decoders[qtype] = LlamaCppDecoder(gguf, max_batch, args.prompt_len + args.new_tokens, torch.get_num_threads())
    print(f"llama.cpp {llama_cpp.__version__}: {', '.join(decoders)} GGUF of the same weights, {torch.get_num_threads()} threads")
    return decoders


if __name__ == "__main__":
    main()

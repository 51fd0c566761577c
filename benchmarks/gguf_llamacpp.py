"""GGUF exports checked by their real consumer: llama.cpp's greedy chat replies against the HF model's own.

    .venv/bin/pip install llama-cpp-python==0.3.36                       # once (builds llama.cpp, ~20 min)
    .venv/bin/python benchmarks/gguf_llamacpp.py                         # built-in SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/gguf_llamacpp.py runs/quickstart/export/hf --max-tokens 64

llama-cpp-python may live in its own virtualenv instead (same Python version); put its site-packages on
the path, e.g. on the project's dev machines:

    PYTHONPATH=/work/llamacpp-venv/lib/python3.11/site-packages .venv/bin/python benchmarks/gguf_llamacpp.py

(tests/test_export.py runs the same comparison on a tiny model when llama_cpp is importable that way).

For MODEL_DIR (an HF directory or a built-in name; default smollm2-135m-instruct) it writes every GGUF type
`rlhfkit export` supports, loads each in llama.cpp (llama_cpp.Llama, create_chat_completion through the
chat template stored in the GGUF, temperature 0, --max-tokens) and compares with the HF model's greedy
replies (transformers, fp32, same chat template) on --prompts fixed prompts. Per type it prints:

* replies identical, and first --first-n tokens agree (the llama.cpp reply re-tokenized by the HF tokenizer);
* teacher-forced on the HF replies: llama.cpp's top token against the HF model's at every reply position,
  overall and where the HF model's top token leads by >= --margin logits ("confident"), and max |Δlogit|;
* whether llama.cpp tokenizes the rendered chat prompt into the same ids as the HF tokenizer.

Pass: f16 replies identical on every prompt; every type agrees on every confident position and tokenizes
every prompt the same. A q8_0 reply may leave the HF one at a near-tie: llama.cpp also quantizes the
activations of a Q8_0 matmul to 8 bits, which moves SmolLM2-135M's logits by 1-3, and its first reply token
to "What is the capital of France?" leads by 0.08 only. Exits 1 on a failed check, 2 without llama-cpp-python.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "List three fruits.",
    "Write a haiku about the sea.",
    "Give me a numbered list of five tips for learning to cook.",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish and German.",
    "Name three planets of the solar system.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="HF dir or built-in name")
    parser.add_argument("--prompts", type=int, default=6, help=f"how many of the {len(PROMPTS)} fixed prompts")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--first-n", type=int, default=16)
    parser.add_argument("--margin", type=float, default=2.0, help="a confident position's top-1 lead, in logits")
    parser.add_argument("--out", default=None, help="keep the GGUF files here (default: a temp dir)")
    parser.add_argument("--show", action="store_true", help="print every reply pair")
    parser.add_argument("--extra", action="append", default=[], metavar="GGUF",
                        help="also compare this GGUF file (e.g. one from llama.cpp's convert_hf_to_gguf.py); "
                             "printed, not checked")
    args = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        from rlhfkit.export import LLAMACPP_PIN

        print(f"llama-cpp-python not installed: pip install {LLAMACPP_PIN}", file=sys.stderr)
        return 2
    from rlhfkit.config import ModelConfig
    from rlhfkit.export import GGUF_TYPES, hf_greedy_replies, llamacpp_agreement, write_gguf
    from rlhfkit.models.loading import resolve_model_dir

    model_dir = Path(resolve_model_dir(args.model, ModelConfig(name_or_path=args.model)))
    prompts = PROMPTS[:args.prompts]
    start = time.perf_counter()
    tok, replies = hf_greedy_replies(model_dir, prompts, args.max_tokens)
    print(f"{model_dir}: HF greedy replies to {len(prompts)} prompts, up to {args.max_tokens} tokens "
          f"({time.perf_counter() - start:.0f}s); llama-cpp-python {llama_cpp.__version__}")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = [(qtype, write_gguf(model_dir, out / f"model-{qtype}.gguf", qtype)) for qtype in GGUF_TYPES]
        for label, gguf_file in files + [(Path(f).name, Path(f)) for f in args.extra]:
            result = llamacpp_agreement(gguf_file, tok, replies, args.max_tokens, args.first_n, args.margin)
            print(summary_line(label, result))
            if args.show:
                for row in result["rows"]:
                    print(f"    {row['prompt']!r}\n      hf:        {row['hf_text']!r}")
                    print(f"      llama.cpp: {row['llamacpp_text']!r}")
            if label in GGUF_TYPES:
                failed += [f"{label}: {problem}" for problem in problems(label, result)]
    for problem in failed:
        print(f"FAIL {problem}")
    return 1 if failed else 0


def summary_line(qtype: str, r: dict) -> str:
    n = r["prompts"]
    return (f"{qtype}: {r['identical']}/{n} prompts identical, first {r['first_n']} tokens agree on "
            f"{r['first_n_agree']}/{n}; teacher-forced top-1 {r['top1_agree']}/{r['positions']}, confident "
            f"(lead >= {r['confident_margin']:g}) {r['confident_agree']}/{r['confident']}; "
            f"max |Δlogit| {r['max_abs_logit_diff']:.3g}; prompt tokens same on {r['same_prompt_tokens']}/{n}")


def problems(qtype: str, r: dict) -> list[str]:
    """What fails the check: see the module docstring."""
    found = []
    if r["same_prompt_tokens"] < r["prompts"]:
        found.append("llama.cpp tokenizes a chat prompt differently from the HF tokenizer")
    if r["confident_agree"] < r["confident"]:
        found.append(f"llama.cpp's top token differs at {r['confident'] - r['confident_agree']} confident positions")
    if qtype == "f16" and r["identical"] < r["prompts"]:
        found.append(f"{r['prompts'] - r['identical']} replies differ from the HF model's")
    return found


if __name__ == "__main__":
    sys.exit(main())

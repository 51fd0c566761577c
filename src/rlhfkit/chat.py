"""`rlhfkit chat MODEL_DIR`: a multi-turn terminal chat with streamed tokens through the chat template.

Works on an exported model, a stage's final/ directory, or a checkpoint's model/ directory.
Commands: /reset (forget the conversation), /exit (or end of input).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

from .engine.precision import torch_dtype


def load_chat_model(model_dir: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        path = path / "model"  # a checkpoint dir: its exported model
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    # from_pretrained at a half precision casts the weights only (rotary buffers stay fp32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, "chat --dtype"))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tok


def chat(model, tok, max_new_tokens: int = 256, temperature: float = 0.7, system: str | None = None,
         stdin=sys.stdin, stdout=sys.stdout, seed: int | None = None) -> list[dict]:
    """Read user turns from stdin until /exit or end of input; returns the conversation as it ended."""
    from transformers import TextIteratorStreamer

    if not tok.chat_template:
        raise ValueError("this tokenizer has no chat template; rlhfkit chat needs one")
    interactive = stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    start = list(history)
    print("rlhfkit chat — /reset to start over, /exit to quit", file=stdout, flush=True)
    while True:
        if interactive:
            print(">>> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("[conversation reset]", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(**ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0, streamer=streamer,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            kwargs["temperature"] = temperature
        worker = threading.Thread(target=model.generate, kwargs=kwargs)
        worker.start()
        reply = []
        for piece in streamer:
            reply.append(piece)
            print(piece, end="", file=stdout, flush=True)
        worker.join()
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    return history

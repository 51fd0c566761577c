"""`rlhfkit chat MODEL_DIR`: a multi-turn terminal chat with streamed tokens through the chat template.

Works on an exported model, a stage's final/ directory, or a checkpoint's model/ directory.
Commands: /reset (forget the conversation), /exit (or end of input).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch

from .engine.precision import torch_dtype
from .errors import ModelLoadError

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_chat_model(model_dir: str, dtype: str = "auto"):
    """The model and tokenizer of an HF directory (or a checkpoint dir's model/); a broken directory is a
    ModelLoadError that names it and what is wrong, never a library traceback."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = chat_model_dir(Path(model_dir))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None
    try:
        # from_pretrained at a half precision casts the weights only (rotary buffers stay fp32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, "chat --dtype"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(f"{path}: cannot load the model weights ({_first_line(e)})") from None
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tok


def chat_model_dir(path: Path) -> Path:
    """The directory to load, checked for what from_pretrained needs: a readable config, weights, a tokenizer."""
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        path = path / "model"  # a checkpoint dir: its exported model
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        raise ModelLoadError(f"{config}: not a valid JSON config (a half-written or damaged file?)") from None
    if not model_type:
        raise ModelLoadError(f"{config}: no model_type; this is not a transformers model config")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        if (path / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{path} holds a LoRA adapter only; chat needs merged weights (lora.save: merged)")
        raise ModelLoadError(f"{path}: no model weights (none of {', '.join(_WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    return path


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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

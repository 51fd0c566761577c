"""`rlhfkit chat MODEL_DIR`: a multi-turn terminal chat with streamed tokens through the chat template.

Works on an exported model, a stage's final/ directory, or a checkpoint's model/ directory; a model trained
on plain prompts (data.template: plain) chats in that format (data/plain_template.py). Any other directory is
a message saying what it is and what to pass instead. Commands: /reset (forget the conversation), /exit (or
end of input).

With tools (`--tools calculator,python,file.py:fn`, loaded as ppo.tools loads them, described to the model as
in RL: docs/agents.md), a reply that calls tools has its calls run, each call and its result (or its error
observation) shown, the results added as tool messages, and the model goes on: up to --max-turns replies per
message.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch

from .agents.calls import ToolCall, parse_tool_calls, template_takes_tools, with_tool_instructions
from .agents.runner import run_calls
from .agents.tools import Tool
from .data.plain_template import plain_template_for
from .engine.precision import torch_dtype
from .errors import ModelLoadError
from .models.reward import HEAD_FILE

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_chat_model(model_dir: str, dtype: str = "auto"):
    """The model and tokenizer of an HF directory (or a checkpoint dir's model/), with the chat template of the
    format it was trained on; a directory that is not such a model is a ModelLoadError that names it and what
    is wrong, never a library traceback."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = chat_model_dir(Path(model_dir))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged tokenizer file fails anywhere in tokenizers/transformers (KeyError, …)
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None
    tok.chat_template = plain_template_for(path, tok) or tok.chat_template
    if not tok.chat_template:
        raise ModelLoadError(f"{path}: the tokenizer has no chat template, and no run record says which prompt "
                             f"format the model learned (a base model?). Chat with a model rlhfkit trained (its "
                             f"stage's final/ or the export's hf/), or add a chat_template.jinja to {path}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # weights that do not match are said below, not in a table of every tensor
    try:
        # from_pretrained at a half precision casts the weights only (rotary buffers stay fp32)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, "chat --dtype"),
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelLoadError(f"{path}: cannot load the model weights ({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(f"{path}: model.safetensors does not hold the weights config.json describes "
                             f"({len(missing)} missing, e.g. {missing[0]})")
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tok


def chat_model_dir(path: Path) -> Path:
    """The directory to load, checked for what from_pretrained needs: a readable config, weights, a tokenizer."""
    if path.is_file():
        hint = " (a GGUF file: chat with it in llama.cpp)" if path.suffix == ".gguf" else ""
        raise ModelLoadError(f"{path} is a file{hint}; rlhfkit chat takes a model directory")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        path = path / "model"  # a checkpoint dir: its exported model
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json){_model_dirs_inside(path)}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        raise ModelLoadError(f"{config}: not a valid JSON config (a half-written or damaged file?)") from None
    if not model_type:
        raise ModelLoadError(f"{config}: no model_type; this is not a transformers model config")
    if (path / HEAD_FILE).is_file():
        raise ModelLoadError(f"{path} is a reward model (it scores text, it does not write any); chat with a "
                             f"policy: the run's ppo/final (or dpo/final, sft/final) or export/hf")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        if (path / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{path} holds a LoRA adapter only; chat needs merged weights (lora.save: merged)")
        raise ModelLoadError(f"{path}: no model weights (none of {', '.join(_WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    return path


def _model_dirs_inside(path: Path) -> str:
    """"; chat models in it: …" for a run or stage directory, so that the message says what to pass."""
    found = sorted({str(c.parent.relative_to(path)) for pattern in ("*/config.json", "*/*/config.json")
                    for c in path.glob(pattern) if not (c.parent / HEAD_FILE).is_file()})
    return f"; chat models in it: {', '.join(found)}" if found else ""


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def chat(model, tok, max_new_tokens: int = 256, temperature: float = 0.7, system: str | None = None,
         stdin=sys.stdin, stdout=sys.stdout, seed: int | None = None, tools: dict[str, Tool] | None = None,
         max_turns: int = 5, tool_timeout: float = 10.0) -> list[dict]:
    """Read user turns from stdin until /exit or end of input; returns the conversation as it ended. With
    `tools` (name → Tool), each message gets up to max_turns replies: one that calls tools has them run under
    one deadline of tool_timeout seconds, and the model reads their results in the next."""
    if not tok.chat_template:
        raise ModelLoadError("this tokenizer has no chat template; rlhfkit chat needs one")
    interactive = stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    start = list(history)
    render = _renderer(tok, tools)
    print("rlhfkit chat — /reset to start over, /exit to quit", file=stdout, flush=True)
    if tools:
        print(f"[tools: {', '.join(tools)}; up to {max_turns} replies per message]", file=stdout, flush=True)
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
        before = len(history)
        history.append({"role": "user", "content": text})
        for turn in range(max_turns if tools else 1):
            reply, failure = _reply(model, tok, render(history), max_new_tokens, temperature, seed, stdout)
            if failure:
                del history[before:]
                print(f"[no reply: {failure}. /reset starts the conversation over]", file=stdout, flush=True)
                break
            history.append({"role": "assistant", "content": reply.strip()})
            calls = parse_tool_calls(reply) if tools else []
            if not calls:
                break
            if turn == max_turns - 1:
                print(f"[{len(calls)} tool call(s) not run: this was reply {max_turns} of --max-turns {max_turns}]",
                      file=stdout, flush=True)
                break
            for call, observation in zip(calls, run_calls(calls, tools, tool_timeout)):
                shown = (f"{call.name}({json.dumps(call.arguments, ensure_ascii=False)})" if isinstance(call, ToolCall)
                         else "(unreadable)")
                kind = "result" if observation.error is None else f"error: {observation.error}"
                print(f"[tool call] {shown}\n[tool {kind}] {observation.content}", file=stdout, flush=True)
                history.append(observation.message)
    return history


def _renderer(tok, tools: dict[str, Tool] | None):
    """history → the prompt text, with the tools described as in RL: `tools=` where the template takes them,
    else the call format's instructions in the system message (calls.with_tool_instructions)."""
    from jinja2 import TemplateError

    schemas = [t.schema for t in (tools or {}).values()]
    takes_tools = bool(schemas) and template_takes_tools(tok)

    def render(history: list[dict]) -> str:
        messages = history if takes_tools or not schemas else with_tool_instructions(history, schemas)
        kwargs = {"tools": schemas} if takes_tools else {}
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except TemplateError as e:  # e.g. a template without a system role, given --system
            raise ModelLoadError(f"the model's chat template refuses this conversation: {_first_line(e)}") from None
    return render


def _reply(model, tok, prompt: str, max_new_tokens: int, temperature: float, seed: int | None,
           stdout) -> tuple[str, str | None]:
    """The model's reply to the prompt text, streamed to stdout: (reply, None), or ("", why) where generation
    failed (with the lengths where the conversation is longer than the model takes)."""
    from transformers import TextIteratorStreamer

    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(**ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kwargs["temperature"] = temperature
    reply, failure = _stream_reply(model, streamer, kwargs, stdout)
    print(file=stdout, flush=True)
    if failure:
        n, limit = ids["input_ids"].shape[1], getattr(model.config, "max_position_embeddings", None)
        if limit and n + max_new_tokens > limit:
            failure += f" ({n} tokens of conversation + up to {max_new_tokens} new ones; the model takes {limit})"
    return reply, failure


def _stream_reply(model, streamer, kwargs: dict, stdout) -> tuple[str, str | None]:
    """(the reply, None), printed piece by piece as generate() (in a thread) streams it; ("", the error) when
    generation fails, e.g. on a conversation longer than a model's learned positions, instead of leaving the
    stream waiting for pieces that never come."""
    failure: list[str] = []

    def generate():
        try:
            model.generate(streamer=streamer, **kwargs)
        except Exception as e:  # whatever it is, the chat goes on: the user can /reset
            failure.append(_first_line(e))
            streamer.end()

    worker = threading.Thread(target=generate)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        print(piece, end="", file=stdout, flush=True)
    worker.join()
    return ("", failure[0]) if failure else ("".join(pieces), None)

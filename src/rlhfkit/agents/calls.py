"""The tool-call format: how the model writes a call, how rlhfkit reads it, and how a result goes back.

One format for every template, the Hermes/Qwen one that chat templates with tool support use:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "3 * (4 + 5)"}}
    </tool_call>

A message may hold several calls; text around them is free. A template that takes `tools=` describes the tools
to the model itself; for one that does not (it renders the same text with and without them), the
instructions of `tool_instructions` go into the system message instead, so the model learns the same format.
A result goes back as a `tool` message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """A call that parsed: its tool name and arguments (a JSON object)."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class BadCall:
    """A <tool_call> block that did not parse; `problem` says why, `name` is the tool's name where it was read."""

    problem: str
    name: str = ""


def parse_tool_calls(text: str) -> list[ToolCall | BadCall]:
    """Every <tool_call> block of `text`, in order: a ToolCall where it holds {"name": str, "arguments": {...}}
    ("arguments" may be left out for a tool without any), else a BadCall. [] when the text calls no tool.
    A block without its closing tag runs to the end of the text and is a BadCall."""
    calls: list[ToolCall | BadCall] = []
    for match in _BLOCK.finditer(text):
        body = match.group(1).strip()
        if not match.group(0).endswith(CALL_CLOSE):
            calls.append(BadCall(f"{CALL_OPEN} is not closed by {CALL_CLOSE}"))
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(BadCall(f"not valid JSON ({e.msg} at character {e.pos})"))
            continue
        if not isinstance(call, dict):
            calls.append(BadCall(f"expected a JSON object {{\"name\": ..., \"arguments\": {{...}}}}, got {_kind(call)}"))
            continue
        name, arguments = call.get("name"), call.get("arguments", {})
        extra = sorted(set(call) - {"name", "arguments"})
        if not isinstance(name, str) or not name:
            calls.append(BadCall('the object has no "name" string'))
        elif not isinstance(arguments, dict):
            calls.append(BadCall(f'"arguments" must be a JSON object, got {_kind(arguments)}', name))
        elif extra:
            calls.append(BadCall(f'unexpected key{"s" if len(extra) > 1 else ""} {", ".join(map(repr, extra))} '
                                 '(a call holds "name" and "arguments")', name))
        else:
            calls.append(ToolCall(name, arguments))
    return calls


def tool_message(name: str, content: str) -> dict:
    """A tool's result (or its error observation) as a chat message."""
    return {"role": "tool", "name": name, "content": content}


def tool_instructions(schemas: list[dict]) -> str:
    """The system-message text that tells a model without tool support in its template what tools it has and
    how to call them (the same format as templates with tools, so one parser reads both)."""
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("You may call tools to help with the task. The tools, as JSON schemas:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a tool, write a JSON object with its name and arguments between tags, like this:\n"
            f'{CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{"<argument>": <value>}}}}\n{CALL_CLOSE}\n'
            "then stop and wait: each result comes back in a message from the tool. "
            "When you have the answer, reply without a tool call.")


def with_tool_instructions(messages: list[dict], schemas: list[dict]) -> list[dict]:
    """`messages` with tool_instructions put into the system message: before its content where there is one,
    as a new first message where there is none. The input list is not changed."""
    text = tool_instructions(schemas)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=f"{text}\n\n{messages[0]['content']}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def template_takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows `tools=` to the model: it renders a conversation differently
    with a tool than without. False for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_tool", "description": "A probe.",
                                             "parameters": {"type": "object", "properties": {}}}}
    plain = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    return plain != tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")

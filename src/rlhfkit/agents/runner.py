"""Running tool calls: every call of a batch at once, each in its own thread, under one deadline.

Whatever goes wrong becomes an observation the model reads, never an exception: a call that did not parse
(parse_error), names no tool it has (unknown_tool), has missing, extra or mistyped arguments
(bad_arguments), raises (tool_error) or is still running at the deadline (timeout).

Why threads and not processes: a tool is any Python function loaded into the trainer's process (a file's
module, a closure), so a thread runs it as it is, with no pickling and no new interpreter per call (on a
2-core CPU a process per call costs ~0.2 s of CPU for each of a batch's calls). The deadline bounds the
batch: `run_calls` returns at the latest `timeout` seconds after it starts, whatever the tools do. Python
cannot stop a thread, though: a call past its deadline is abandoned, its result dropped, and its thread runs
on in the background until the function returns (`still_running` counts them). A tool that may hang or burn
CPU must do its work in a process it can kill, as the built-in `python` tool does.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from .calls import CALL_CLOSE, CALL_OPEN, BadCall, ToolCall, tool_message
from .tools import Tool, check_arguments

ERROR_KINDS = ("parse_error", "unknown_tool", "bad_arguments", "tool_error", "timeout")

# threads of calls abandoned at their deadline; pruned as they end
_abandoned: set[threading.Thread] = set()
_abandoned_lock = threading.Lock()


@dataclass(frozen=True)
class Observation:
    """What the model reads after one call. name: the tool's name ("" when the call named none); content: the
    result or the error text; error: one of ERROR_KINDS, None for a result."""

    name: str
    content: str
    error: str | None = None

    @property
    def message(self) -> dict:
        return tool_message(self.name, self.content)


def run_calls(calls: list[ToolCall | BadCall], tools: dict[str, Tool], timeout: float) -> list[Observation]:
    """One observation per call, in order. The valid calls run concurrently, each in a new daemon thread; the
    function returns when all have finished or `timeout` seconds have passed, whichever is first."""
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    out: list[Observation | None] = [None] * len(calls)
    running: list[tuple[int, threading.Thread, list]] = []
    for i, call in enumerate(calls):
        if isinstance(call, BadCall):
            out[i] = Observation(call.name, f"Error: the tool call could not be read: {call.problem}. Write a call "
                                 f'as {CALL_OPEN}{{"name": "<tool name>", "arguments": {{...}}}}{CALL_CLOSE}.',
                                 "parse_error")
        elif call.name not in tools:
            known = ", ".join(tools) or "none"
            out[i] = Observation(call.name, f"Error: there is no tool named {call.name!r}. The tools are: {known}.",
                                 "unknown_tool")
        elif (problem := check_arguments(tools[call.name], call.arguments)) is not None:
            out[i] = Observation(call.name, f"Error: bad arguments for {call.name}: {problem}.", "bad_arguments")
        else:
            slot: list = []
            thread = threading.Thread(target=_call, args=(tools[call.name], call.arguments, slot), daemon=True,
                                      name=f"rlhfkit-tool-{call.name}")
            thread.start()
            running.append((i, thread, slot))
    for i, thread, slot in running:
        thread.join(max(0.0, deadline - time.monotonic()))
        name = calls[i].name
        if thread.is_alive():
            with _abandoned_lock:
                _abandoned.add(thread)
            out[i] = Observation(name, f"Error: {name} did not finish within {timeout:g} s.", "timeout")
        else:
            ok, value = slot[0]
            out[i] = Observation(name, value) if ok else Observation(name, f"Error: {name} raised {value}", "tool_error")
    return out


def still_running() -> int:
    """How many calls abandoned at their deadline have not returned yet (their threads still use the CPU)."""
    with _abandoned_lock:
        _abandoned.difference_update([t for t in _abandoned if not t.is_alive()])
        return len(_abandoned)


def _call(tool: Tool, arguments: dict, slot: list) -> None:
    try:
        slot.append((True, _as_text(tool.function(**arguments))))
    except BaseException as e:  # a tool's failure, sys.exit included, is the model's observation
        slot.append((False, f"{type(e).__name__}: {e}"))


def _as_text(value) -> str:
    """A tool's return value as the model reads it: a string as it is, anything else as JSON where it can be."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)

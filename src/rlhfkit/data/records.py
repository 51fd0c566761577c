"""Typed records: every source is normalised into an `Example` (chat turns + responses) or a `BadRecord`.

Three formats:
  preference  {prompt, chosen, rejected}            feeds phases 1 (prompt + chosen), 2 (pairs) and 3 (prompt)
  sft         {prompt, response} or {messages}      feeds phase 1
  prompt      {prompt} or {messages}                feeds phase 3
TRL's dataset formats are read too (docs/data.md): `completion` for `response`; `messages` (a conversation
whose last assistant turn is the response); responses as one assistant message; chosen and rejected as whole
conversations whose shared leading turns are the prompt (TRL's implicit prompt).
A record's other fields (those its format does not read, e.g. GSM8K's `id` and `final_answer`) are its
`metadata`, kept as they are when they are JSON values (a parquet date or bytes field is left out): phase 3
stores it with each prompt and the reward sources receive it.
`prompt` is a plain string, an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant:"), or a list of
{role, content} messages. Anthropic's raw hh-rlhf ({chosen, rejected} full transcripts) is read as
preference pairs by splitting the two transcripts at their common prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = {"Human": "user", "Assistant": "assistant"}
# what chat templates render (tool: a tool's result, in tool-use transcripts); anything else would be rendered blindly
CHAT_ROLES = ("system", "user", "assistant", "tool")
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Example:
    id: str
    where: str  # "file:line", for messages about this record
    prompt: list[dict]  # chat turns; the last one is the user's (or, in a tool-use transcript, a tool's)
    chosen: str | None = None  # the preferred response (or the only one, for SFT)
    rejected: str | None = None
    # the record's other fields (e.g. GSM8K's final_answer), carried with phase-3 prompts to the reward
    metadata: dict = field(default_factory=dict)


class BadRecord(Exception):
    """A record that cannot be used. `reason` is a short code for counting, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str, where: str = ""):
        super().__init__(f"{where}: {detail}" if where else detail)
        self.reason, self.detail, self.where = reason, detail, where


REQUIRED = {"preference": ("prompt", "chosen", "rejected"), "sft": ("prompt", "response"), "prompt": ("prompt",)}
CONSUMED = {fmt: frozenset(fields) for fmt, fields in REQUIRED.items()}  # what a format reads; the rest is metadata
# what a format also reads (TRL's layouts, `_trl_names`), for the message when no record is valid
ALSO_ACCEPTED = {"preference": " (no 'prompt' when chosen and rejected are whole conversations or hh transcripts)",
                 "sft": " (or 'completion' for 'response', or one 'messages' conversation)",
                 "prompt": " (or 'messages')"}


def is_json_value(value) -> bool:
    """Whether the value is JSON as json.loads gives it (null, bool, number, string, list, string-keyed object)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json_value(v) for k, v in value.items())
    return False


def record_metadata(raw: dict, fmt: str) -> dict:
    """The fields of a raw record that its format does not read, those that are JSON values, as they are."""
    return {k: v for k, v in raw.items() if k not in CONSUMED[fmt] and is_json_value(v)}


def detect_format(raw: dict) -> str:
    if {"chosen", "rejected"} <= raw.keys():
        return "preference"
    if ("prompt" in raw and raw.keys() & {"response", "completion"}) or "messages" in raw:
        return "sft"
    if "prompt" in raw:
        return "prompt"
    raise BadRecord("unknown_format", f"cannot tell the format from fields {sorted(raw)}: a record needs chosen and "
                    f"rejected (preference), prompt and response or completion, or messages (sft), or a prompt "
                    f"(prompt); rename fields with `fields:` or set `format:`")


def map_fields(raw, fields: dict[str, str], where: str):
    """Rename a record's fields onto rlhfkit's (`fields: {prompt: question}` reads `question` as the prompt).
    A mapped field wins over one already named like its target. Raises BadRecord when a mapped field is missing."""
    if not fields or not isinstance(raw, dict):
        return raw
    for target, source in fields.items():
        if source not in raw:
            raise BadRecord("missing_field", f"no field {source!r}, which `fields:` maps to {target!r} (the record "
                            f"has {sorted(map(str, raw))})", where)
    renamed = {k: v for k, v in raw.items() if k not in fields.values()}
    return renamed | {target: raw[source] for target, source in fields.items()}


def is_hh_transcript(text: str) -> bool:
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def parse_hh_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant turns (a, b, c).

    The trailing empty "Assistant:" marks where the reply goes and is not a turn.
    """
    text = "\n\n" + text.lstrip()
    parts = _TURN.split(text)
    if parts[0].strip():
        raise BadRecord("bad_transcript", "text before the first 'Human:' turn")
    turns = [{"role": ROLES[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic's raw format: two full transcripts that share the prompt. Cut the common prefix back to
    its last "\\n\\nAssistant:" (not just the last "Assistant:", which some replies contain)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind("\n\nAssistant:", 0, n)  # the last marker that lies wholly in the common prefix
    if cut < 0:
        raise BadRecord("bad_transcript", "no '\\n\\nAssistant:' in the common prefix of chosen and rejected")
    end = cut + len("\n\nAssistant:")
    return chosen[:end], chosen[end:], rejected[end:]


def _turn(m, label: str, where: str) -> dict:
    """One {role, content} message, checked (other keys, such as a parquet struct's empty ones, are left out)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise BadRecord("wrong_type", f"{label} must be {{role, content}} with string values", where)
    if m["role"] not in CHAT_ROLES:
        raise BadRecord("unknown_role", f"{label} has the role {m['role']!r}; a message's role must be "
                        f"one of {', '.join(CHAT_ROLES)}", where)
    turn = {"role": m["role"], "content": m["content"]}
    if m["role"] == "tool" and isinstance(m.get("name"), str):
        turn["name"] = m["name"]  # the tool's name, which some templates render
    return turn


def prompt_turns(prompt, where: str) -> list[dict]:
    if isinstance(prompt, list):
        turns = [_turn(m, f"prompt[{i}]", where) for i, m in enumerate(prompt)]
    elif isinstance(prompt, str):
        turns = parse_hh_transcript(prompt) if is_hh_transcript(prompt) else [{"role": "user", "content": prompt.strip()}]
    else:
        raise BadRecord("wrong_type", f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}", where)
    if not turns or not any(t["content"].strip() for t in turns):
        raise BadRecord("empty_prompt", "the prompt is empty", where)
    if turns[-1]["role"] == "assistant":
        raise BadRecord("bad_transcript", "the prompt ends with an assistant turn, so there is no reply to write", where)
    return turns


def _response(raw: dict, field: str, where: str, name: str | None = None) -> str:
    """raw[field] as a response; `name` is the field's name in the record, for messages (default: field)."""
    value, name = raw[field], name or field
    if isinstance(value, list):  # TRL's conversational format: the reply as one assistant message
        turns = [_turn(m, f"{name}[{i}]", where) for i, m in enumerate(value)]
        if [t["role"] for t in turns] != ["assistant"]:
            raise BadRecord("bad_response", f"field {name!r} must hold one assistant message (earlier turns belong "
                            f"in the prompt), got the roles {[t['role'] for t in turns]}", where)
        value = turns[0]["content"]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"field {name!r} must be a string or one assistant message, got "
                        f"{type(value).__name__}", where)
    if not value.strip():
        raise BadRecord("empty_response", f"field {name!r} is empty or whitespace only", where)
    return value.strip()


def split_conversations(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    """TRL's implicit prompt: the turns two conversations share from the start are the prompt, and what
    follows is each one's reply (one assistant turn each, checked by `_response`)."""
    n, most = 0, min(len(chosen), len(rejected)) - 1  # at least the last turn of each is its reply
    while n < most and _same_turn(chosen[n], rejected[n]):
        n += 1
    if n == 0:
        raise BadRecord("bad_transcript", "chosen and rejected share no leading turn, so there is no prompt "
                        "(give one as 'prompt')", where)
    if len(chosen) - n > 1 or len(rejected) - n > 1:
        raise BadRecord("bad_response", f"chosen and rejected share {n} leading turns; after them each must be one "
                        f"assistant reply, but chosen has {len(chosen) - n} turns left and rejected "
                        f"{len(rejected) - n}", where)
    return chosen[:n], chosen[n:], rejected[n:]


def _same_turn(a, b) -> bool:
    return isinstance(a, dict) and isinstance(b, dict) and (a.get("role"), a.get("content")) == (
        b.get("role"), b.get("content"))


def _trl_names(raw: dict, fmt: str, where: str) -> tuple[dict, str]:
    """TRL's field layouts onto rlhfkit's, where the record lacks rlhfkit's own fields:
    `completion` is the response; `messages` is the prompt, less its last turn when that is the assistant's
    reply (then the response); chosen and rejected conversations of more than their reply carry the prompt
    as their shared leading turns (a `prompt` beside them, as UltraFeedback's, is not read, as in TRL).
    Returns the record and the name its response field had, for messages."""
    raw, response_name = dict(raw), "response"
    if fmt == "preference":
        chosen, rejected = raw.get("chosen"), raw.get("rejected")
        if isinstance(chosen, list) and isinstance(rejected, list) and (
                "prompt" not in raw or len(chosen) > 1 or len(rejected) > 1):
            raw["prompt"], raw["chosen"], raw["rejected"] = split_conversations(chosen, rejected, where)
        return raw, response_name
    if "prompt" not in raw and "messages" in raw:
        messages = raw.pop("messages")
        if not isinstance(messages, list):
            raise BadRecord("wrong_type", f"field 'messages' must be a list of messages, got {type(messages).__name__}",
                            where)
        messages = [_turn(m, f"messages[{i}]", where) for i, m in enumerate(messages)]
        ends_with_reply = bool(messages) and messages[-1]["role"] == "assistant"
        raw["prompt"] = messages[:-1] if ends_with_reply else messages
        if fmt == "sft" and "response" not in raw and "completion" not in raw:
            if not ends_with_reply:
                raise BadRecord("bad_transcript", "'messages' must end with an assistant turn: the reply to learn",
                                where)
            raw["response"], response_name = messages[-1]["content"], f"messages[{len(messages) - 1}]"
    if fmt == "sft" and "response" not in raw and "completion" in raw:
        raw["response"], response_name = raw.pop("completion"), "completion"
    return raw, response_name


def to_example(raw, fmt: str, where: str, index: int) -> Example:
    """Validate one raw record of a known format and normalise it. Raises BadRecord."""
    if not isinstance(raw, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(raw).__name__}", where)
    raw, response_name = _trl_names(raw, fmt, where)
    if fmt == "preference" and "prompt" not in raw and {"chosen", "rejected"} <= raw.keys():
        for key in ("chosen", "rejected"):
            if not isinstance(raw[key], str):
                raise BadRecord("wrong_type", f"field {key!r} must be a string (an hh transcript) or a list of "
                                f"messages, as the other one", where)
        try:
            prompt, chosen, rejected = split_hh_pair(raw["chosen"], raw["rejected"])
        except BadRecord as e:
            raise BadRecord(e.reason, e.detail, where) from None
        raw = {**raw, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    missing = [f for f in REQUIRED[fmt] if f not in raw or raw[f] is None]
    if missing:
        raise BadRecord("missing_field", f"missing field {missing[0]!r} (a {fmt} record needs {list(REQUIRED[fmt])})", where)
    try:
        turns = prompt_turns(raw["prompt"], where)
    except BadRecord as e:
        raise BadRecord(e.reason, e.detail, where) from None
    rid = str(raw.get("id", index))
    metadata = record_metadata(raw, fmt)
    if fmt == "preference":
        return Example(rid, where, turns, _response(raw, "chosen", where), _response(raw, "rejected", where),
                       metadata=metadata)
    if fmt == "sft":
        return Example(rid, where, turns, _response(raw, "response", where, response_name), metadata=metadata)
    return Example(rid, where, turns, metadata=metadata)

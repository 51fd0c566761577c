"""A rendered prompt back as its chat turns, for the report.

Eval keeps each prompt as the model saw it: the chat template's text, special tokens included, left-truncated
to data.max_prompt_len tokens. The run's template (the plain format, or the chat template of the tokenizer
its data was prepared with) is rendered once on marker turns; the text around the markers is what the template puts before, between and
after turns, and the prompt is cut at those separators. A template whose separators this cannot find (one
that joins turns with nothing, or rewrites them by position) gives None: the report then shows the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.plain_template import plain_chat_template

_MARKS = {"system": "SYSTEMMARK7", "user": "USERMARK7", "assistant": "ASSISTANTMARK7", "user2": "USERTWOMARK7"}
NEXT = {"system": "user", "user": "assistant", "assistant": "user"}


@dataclass(frozen=True)
class Separators:
    head: dict[str, str]  # role → the text before the first turn when it has that role (system: None when refused)
    between: dict[str, str]  # role → the text from the end of that role's turn to the next turn
    tail: str  # after the last (user) turn: its end and the generation prompt
    bos: str | None  # the BOS token's text, when encoding put it before the rendered text


def separators(template: str, special_tokens: dict[str, str], encoded_bos: bool = False) -> Separators | None:
    """The template's separators, from two renders on marker turns; None when they cannot be told apart."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(turns):
        out = render_jinja_template([[{"role": r.rstrip("2"), "content": _MARKS[r]} for r in turns]],
                                    chat_template=template, add_generation_prompt=True, **special_tokens)
        return out[0][0] if isinstance(out, tuple) else out[0]

    try:
        text = render(["user", "assistant", "user2"])
    except Exception:  # a template that refuses these turns: nothing to learn from it
        return None
    parts = _split(text, ["user", "assistant", "user2"])
    if parts is None:
        return None
    head = {"user": parts[0]}
    between = {"user": parts[1], "assistant": parts[2]}
    try:
        with_system = _split(render(["system", "user"]), ["system", "user"])
    except Exception:  # e.g. "System role not supported"
        with_system = None
    if with_system is not None:
        head["system"], between["system"] = with_system[0], with_system[1]
    if not all(between.values()):  # turns joined by nothing: no place to cut
        return None
    bos = special_tokens.get("bos_token") if encoded_bos else None
    return Separators(head=head, between=between, tail=parts[-1], bos=bos)


def _split(text: str, marks: list[str]) -> list[str] | None:
    """The text before, between and after the markers, each found once and in order."""
    parts, rest = [], text
    for m in marks:
        if text.count(_MARKS[m]) != 1 or _MARKS[m] not in rest:
            return None
        before, rest = rest.split(_MARKS[m])
        parts.append(before)
    return parts + [rest]


def prompt_turns(text: str, seps: Separators) -> list[dict] | None:
    """[{role, content, cut}] of a rendered prompt; `cut` marks a first turn that truncation began inside.
    None when the text does not end the way the template ends a prompt."""
    if seps.bos and text.startswith(seps.bos) and not seps.head["user"].startswith(seps.bos):
        text = text[len(seps.bos):]
    if not text.endswith(seps.tail):
        return None
    body = text[:len(text) - len(seps.tail)]
    role = next((r for r in ("system", "user") if r in seps.head and body.startswith(seps.head[r])), None)
    turns = []
    if role is None:  # truncation began inside a turn: one whose separator comes first
        found = {r: body.find(sep) for r, sep in seps.between.items() if sep in body}
        if not found:
            return [{"role": "user", "content": body, "cut": True}]
        first = min(found.values())
        roles = sorted(r for r, at in found.items() if at == first)  # e.g. chatml ends system and assistant alike
        if len({NEXT[r] for r in roles}) > 1:
            return None
        turns.append({"role": " or ".join(roles), "content": body[:first], "cut": True})
        body, role = body[first + len(seps.between[roles[0]]):], NEXT[roles[0]]
    else:
        body = body[len(seps.head[role]):]
    while True:
        sep = seps.between[role]
        at = body.find(sep)
        if at < 0:
            turns.append({"role": role, "content": body, "cut": False})
            return turns
        turns.append({"role": role, "content": body[:at], "cut": False})
        body, role = body[at + len(sep):], NEXT[role]


def run_separators(run_dir: Path) -> Separators | None:
    """The separators of the format the run's data was rendered in: its data/manifest.json says plain or the
    tokenizer's chat template, and data/resolved_config.yaml which tokenizer that was."""
    data_dir = Path(run_dir) / "data"
    if not (data_dir / "manifest.json").is_file():
        return None
    record = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8")).get("tokenizer", {})
    specials = record.get("special_tokens", {})
    if record.get("template") == "plain":  # encoded with the tokenizer's own special tokens (e.g. a BOS) first
        return separators(plain_chat_template(), specials, encoded_bos=True)
    template = _data_chat_template(data_dir / "resolved_config.yaml")
    return separators(template, specials) if template else None


def _data_chat_template(resolved: Path) -> str | None:
    """The chat template of the tokenizer the data was prepared with (None where it cannot be loaded here)."""
    from pydantic import ValidationError

    from ..config import ModelConfig
    from ..errors import RlhfkitError
    from ..models.loading import load_tokenizer

    try:
        model = yaml.safe_load(resolved.read_text(encoding="utf-8"))["model"]
        return load_tokenizer(ModelConfig.model_validate(model)).chat_template
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValidationError, RlhfkitError):
        return None

"""The plain prompt format as a chat template, so that a model trained on it chats and exports in the format it
learned.

Data is rendered plain (hh-rlhf style "Human: …\\n\\nAssistant:", data/render.py) with `data.template: plain`,
or with `auto` where the tokenizer has no chat template. A model trained so keeps its tokenizer's own template
(or none) in final/; its stage's resolved_config.yaml records how its data was rendered. `plain_template_for`
reads that record, and chat and export use the template it gives: the same text as Renderer.prompt_text
(the default system prompt included), encoded to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
RECORD = "resolved_config.yaml"


def plain_chat_template(prefix: str = "", system_prompt: str | None = None) -> str:
    """Jinja for the plain format. `prefix`: the special tokens the tokenizer puts before an encoded text (plain
    prompts are encoded with them; a chat template is encoded without); `system_prompt`: data.system_prompt,
    put first when the conversation has no system turn."""
    system = json.dumps(system_prompt, ensure_ascii=False) if system_prompt else "none"
    return ("{%- set names = " + json.dumps(ROLE_NAMES) + " -%}"
            "{%- set turns = messages -%}"
            "{%- if " + system + " and (not messages or messages[0]['role'] != 'system') -%}"
            "{%- set turns = [{'role': 'system', 'content': " + system + "}] + messages -%}"
            "{%- endif -%}"
            "{{ " + json.dumps(prefix, ensure_ascii=False) + " }}"
            "{%- for m in turns -%}"
            "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
            "{{ names.get(m['role'], m['role']) }}: {{ m['content'] }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif -%}")


def encoding_prefix(tok) -> str:
    """The special tokens `tok` adds before a text it encodes (e.g. Llama's BOS), as text; "" for none."""
    text = "Human: hello"
    with_specials = tok(text, add_special_tokens=True)["input_ids"]
    plain = tok(text, add_special_tokens=False)["input_ids"]
    n = len(with_specials) - len(plain)
    if n <= 0 or with_specials[n:] != plain:
        return ""
    return tok.decode(with_specials[:n], skip_special_tokens=False)


def stage_record(model_dir: Path) -> Path | None:
    """The resolved config of the stage that wrote model_dir: <stage>/final(-ema), or a checkpoint's
    <stage>/checkpoints/step-N/model (or ema_model)."""
    model_dir = Path(model_dir).resolve()
    if model_dir.name in ("final", "final-ema"):
        stage = model_dir.parent
    elif model_dir.parent.parent.name == "checkpoints":
        stage = model_dir.parents[2]
    else:
        return None
    return stage / RECORD if (stage / RECORD).is_file() else None


def plain_template_for(model_dir: Path, tok) -> str | None:
    """The plain chat template where the record of model_dir's stage says its data was rendered plain (None:
    no record, or the tokenizer's own template was used)."""
    record = stage_record(model_dir)
    if record is None:
        return None
    try:
        raw = yaml.safe_load(record.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):  # a damaged record says nothing
        return None
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict):
        return None
    template = data.get("template", "auto")
    if template == "plain" or (template == "auto" and not tok.chat_template):
        return plain_chat_template(encoding_prefix(tok), data.get("system_prompt"))
    return None

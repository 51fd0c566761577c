"""Seeing and checking a config without running anything.

    rlhfkit config show CONFIG [overrides] [--changed]   the resolved YAML, each key's description as a comment
    rlhfkit config check CONFIG [overrides] [--world-size N]   what the stages would reject, before they start
    python -m rlhfkit.config_tools docs > docs/config.md   the reference of every key, from the schema
"""

from __future__ import annotations

import math
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic.fields import FieldInfo

from .config import (RL_LOOP_KEYS, SEEDED_SECTIONS, ActorConfig, Config, Section, literal_choices, ppo_world_problems,
                     section_types)
from .errors import ConfigError, RlhfkitError

COMMENT_WIDTH = 100


# --- show --------------------------------------------------------------------------------------------

def show_config(cfg: Config, changed: bool = False) -> str:
    """The config as YAML that loads back to the same config: every key with its description as a comment
    above it, or (changed) only the keys whose values differ from their defaults."""
    lines: list[str] = []
    _emit_section(type(cfg), cfg.model_dump(mode="json"), "", changed, lines, run_seed=cfg.run.seed)
    return "\n".join(lines) + "\n"


def _emit_section(cls: type[Section], data: dict, indent: str, changed: bool, lines: list[str],
                  run_seed: int | None = None, path: str = "") -> bool:
    """Append `cls`'s keys (values from `data`) to lines; return whether anything was appended."""
    start = len(lines)
    for name, field in cls.model_fields.items():
        key = f"{path}.{name}" if path else name
        value, sections = data[name], section_types(field.annotation)
        if changed and not _differs(cls, name, field, value, key, run_seed):
            continue
        for line in _comment(description(cls, name, field)):
            lines.append(f"{indent}{line}")
        if isinstance(value, dict) and len(sections) == 1:
            lines.append(f"{indent}{name}:")
            if not _emit_section(sections[0], value, indent + "  ", changed, lines, run_seed, key):
                lines[-1] += " {}"
        elif isinstance(value, list) and value and sections:
            lines.append(f"{indent}{name}:")
            for item in value:
                item_lines: list[str] = []
                _emit_section(_item_class(sections, item), item, "", changed, item_lines, run_seed, key)
                first = next(i for i, line in enumerate(item_lines) if not line.startswith("#"))
                lines += [f"{indent}  {line}" for line in item_lines[:first]]  # the first key's comment
                lines += [f"{indent}  {'- ' if i == first else '  '}{line}" for i, line in enumerate(item_lines)
                          if i >= first]
        else:
            lines.append(f"{indent}{name}: {_yaml_value(value)}")
    return len(lines) > start


def _differs(cls: type[Section], name: str, field: FieldInfo, value, key: str, run_seed: int | None) -> bool:
    if field.is_required() or name == "type":  # a reward source's type names its kind even where it is the default
        return True
    if name == "seed" and key.split(".")[0] in SEEDED_SECTIONS and key.count(".") == 1:
        return value != run_seed  # inherited from run.seed unless set
    default = field.get_default(call_default_factory=True)
    if isinstance(default, Section):
        default = default.model_dump(mode="json")
    elif isinstance(default, list):
        default = [d.model_dump(mode="json") if isinstance(d, Section) else d for d in default]
    return _json_like(value) != _json_like(default)


def _json_like(value):
    """Tuples as lists (a dump's tuples are lists), recursively, for comparing a value with its default."""
    if isinstance(value, (list, tuple)):
        return [_json_like(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_like(v) for k, v in value.items()}
    return value


def _item_class(options: list[type[Section]], item: dict) -> type[Section]:
    """A list item's class: the only one, or the union member whose `type` is the item's."""
    if len(options) == 1:
        return options[0]
    return next(c for c in options if item.get("type") in literal_choices(c.model_fields["type"].annotation))


def description(cls: type[Section], name: str, field: FieldInfo) -> str:
    if issubclass(cls, ActorConfig) and name in RL_LOOP_KEYS:
        return f"not read here; the RL loop's setting: {RL_LOOP_KEYS[name]}"
    return field.description or ""


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, COMMENT_WIDTH)] if text else []


def _yaml_value(value) -> str:
    """One value in YAML's flow style, on one line (strings quoted where YAML would misread them)."""
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 30, allow_unicode=True,
                          sort_keys=False).strip()[1:-1]


# --- check -------------------------------------------------------------------------------------------

def check_config(cfg: Config, world_size: int = 1) -> list[str]:
    """Every problem the run would meet at a stage's start that the config alone shows, each starting with
    the key it concerns: batch sizes against `world_size` processes, sampling, the time budget, reward
    functions, tools and the environment, data and prompt files, and the GGUF export type against the model's
    architecture. Loads no model weights."""
    from .agents.environments import load_environment
    from .agents.tools import load_tools
    from .export import gguf_export_problem
    from .pipeline import ALL_STAGES, check_budget, stages_for
    from .rewards.sources import build_text_sources
    from .rollout.sampling import check_ppo_sampling

    problems = missing_files(cfg)
    try:
        stages = stages_for(cfg)  # it may read the data (is there SFT data?): check every stage if it cannot
    except RlhfkitError as e:
        problems += [] if problems else [str(e)]
        stages = list(ALL_STAGES)
    checks = []
    if "ppo" in stages:
        problems += ppo_world_problems(cfg.ppo, world_size)
        checks += [lambda: check_ppo_sampling(cfg.ppo.sampling), lambda: build_text_sources(cfg.ppo.reward.sources)]
    if cfg.pipeline.time_budget_minutes is not None:
        checks.append(lambda: check_budget(cfg, stages))
    if "eval" in stages:
        checks.append(lambda: build_text_sources(cfg.eval.rewards, setting="eval.rewards"))
    if {"ppo", "eval"} & set(stages):  # both run the episodes
        checks.append(lambda: load_tools(cfg.ppo.tools, "ppo.tools"))
        if cfg.ppo.environment:
            checks.append(lambda: load_environment(cfg.ppo.environment, "ppo.environment", openenv=cfg.ppo.openenv))
    for check in checks:
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    if "export" in stages:
        problem = gguf_export_problem(cfg)
        if problem:
            problems.append(problem)
    return problems


def missing_files(cfg: Config) -> list[str]:
    """Local data and prompt files, and a judge, that the config names and that do not exist."""
    from .pipeline import missing_judges

    out = []
    for i, ds in enumerate(cfg.data.datasets):
        for key in ("path", "eval_path"):
            value = getattr(ds, key)
            if value and not Path(value).exists():
                out.append(f"data.datasets.{i}.{key}: {value} not found (dataset {ds.name!r})")
    for i, spec in enumerate(cfg.eval.prompt_sets):
        if spec != "phase3" and not Path(spec).exists():
            out.append(f"eval.prompt_sets.{i}: {spec} not found")
    return out + missing_judges(cfg)


def batch_summary(cfg: Config, world_size: int) -> list[str]:
    """The batch arithmetic of each training stage the pipeline runs, at `world_size` processes (valid
    sizes: check_config passed)."""
    from .pipeline import stages_for

    lines = []
    for stage in stages_for(cfg):
        if stage in ("sft", "rm", "dpo"):
            t = getattr(cfg, stage)
            rows = t.micro_batch_size * t.gradient_accumulation_steps * world_size
            lines.append(f"{stage}: {t.micro_batch_size} {'pairs' if stage != 'sft' else 'examples'} × "
                         f"{t.gradient_accumulation_steps} accumulation × {plural(world_size, 'process', 'processes')} = {rows} "
                         "per optimizer step")
        elif stage == "ppo":
            p = cfg.ppo
            per_process = p.responses_per_update // world_size
            micro = math.ceil(per_process / p.actor.micro_batch_size)
            lines.append(f"ppo: {p.rollout_batch_size} prompts × {p.n_samples_per_prompt} = {p.responses_per_step} "
                         f"responses per step; {plural(p.responses_per_step // p.responses_per_update, 'update')} "
                         f"of {p.responses_per_update} responses per epoch ({per_process} per process: "
                         f"{plural(micro, 'micro-batch', 'micro-batches')} of at most {p.actor.micro_batch_size}) × "
                         f"{plural(p.ppo_epochs, 'epoch')}")
    return lines


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# --- docs --------------------------------------------------------------------------------------------

DOCS_COMMAND = "python -m rlhfkit.config_tools docs > docs/config.md"


def config_docs() -> str:
    """docs/config.md: every section and key of the schema with its type, default and description."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the schema in `src/rlhfkit/config.py` by",
        "",
        f"    {DOCS_COMMAND}",
        "",
        "(tests/test_config_tools.py fails when this file is out of date). `rlhfkit config show CONFIG` prints",
        "a config with these descriptions as comments (`--changed`: only what differs from the defaults);",
        "`rlhfkit config check CONFIG --world-size N` checks it without running anything.",
        "",
        "Every stage's `seed` defaults to `run.seed`. Keys are set in the YAML recipe or on the command line",
        "as dotted overrides (`sft.learning_rate=1e-5`, `data.datasets.0.max_records=100`).",
        "",
    ]
    _doc_section(Config, "", out, {})
    return "\n".join(out).rstrip("\n") + "\n"


def _doc_section(cls: type[Section], path: str, out: list[str], first: dict[type, str]) -> None:
    """A table of cls's keys, then a heading per nested section (a class already documented at another path,
    e.g. every stage's `lora`, refers to that one)."""
    rows, nested = [], []
    for name, field in cls.model_fields.items():
        key = f"{path}.{name}" if path else name
        sections = section_types(field.annotation)
        if typing.get_origin(field.annotation) is list and len(sections) > 1 and sections[0] in first:
            out_of_line = f"The same types as `{first[sections[0]].split(' (')[0]}`."  # eval.rewards
            nested.append((f"{key}[]", key, None, out_of_line))
        elif typing.get_origin(field.annotation) is list and sections:  # datasets, reward sources
            nested += [(f"{key}[]" + (f" ({_type_tag(c)})" if len(sections) > 1 else ""), key, c, c.__doc__)
                       for c in sections]
        elif sections:
            nested.append((key, key, sections[0], field.description))
        if path:  # the root's keys are the sections themselves
            rows.append(f"| `{name}` | {_type_name(field)} | {_default(field, key)} | "
                        f"{_cell(description(cls, name, field))} |")
    if rows:
        out += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    for heading, key, sub, text in nested:
        out += [f"{'#' * min(2 + heading.count('.'), 4)} `{heading}`", ""]
        if text:
            out += [_cell(text), ""]
        if sub is None:
            continue
        if sub in first:
            out += [f"The same keys as `{first[sub]}`.", ""]
            continue
        first[sub] = heading
        _doc_section(sub, key, out, first)


def _type_tag(cls: type[Section]) -> str:
    return f"type: {literal_choices(cls.model_fields['type'].annotation)[0]}"


def _type_name(field: FieldInfo) -> str:
    text = _annotation_name(field.annotation)
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    return _cell(text + (f" ({', '.join(bounds)})" if bounds else ""))


def _annotation_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _annotation_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_annotation_name(a) for a in args if a is not type(None)]
        if len(names) > 1 and all(issubclass(a, Section) for a in args if isinstance(a, type)):
            return "reward source"
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        inner = ", ".join("…" if a is Ellipsis else _annotation_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo, key: str) -> str:
    if field.is_required():
        return "required"
    if key.count(".") == 1 and key.endswith(".seed") and key.split(".")[0] in SEEDED_SECTIONS:
        return "run.seed"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, Section):
        return "see below"
    if isinstance(default, list):
        default = [d.model_dump(mode="json", exclude_defaults=True) | {"type": d.type} if isinstance(d, Section)
                   else d for d in default]
    return _cell(f"`{_yaml_value(_json_like(default))}`")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["docs"]:
        print(f"usage: {DOCS_COMMAND}", file=sys.stderr)
        return 2
    sys.stdout.write(config_docs())
    return 0


if __name__ == "__main__":
    sys.exit(main())

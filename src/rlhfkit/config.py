"""Typed run configuration: one YAML recipe per run, plus dotted command-line overrides.

    rlhfkit data prepare configs/quickstart.yaml data.max_seq_len=256

Every section forbids unknown keys, so a typo is an error naming the key and the file, never a
silently ignored setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """A small random Llama for tests: vocab ~1000, 2 layers, loads in milliseconds."""

    vocab_size: int = Field(1000, ge=300)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(1024, ge=16)
    chat_template: bool = True
    seed: int = 0


class ModelConfig(Section):
    # A local HF directory, a hub id, or a built-in name: "smollm2-135m-instruct" (the embedded GGUF)
    # or "tiny-random" (built from `tiny`).
    name_or_path: str = "smollm2-135m-instruct"
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


DatasetFormat = Literal["preference", "sft", "prompt"]


class DatasetConfig(Section):
    """One dataset of the blend: a registry name (hub) or a local file in the uniform format."""

    name: str
    path: str | None = None  # local json / jsonl / jsonl.gz / parquet; its records are the train split
    eval_path: str | None = None  # local eval split; without one, `data.eval_fraction` is carved out
    format: DatasetFormat | None = None  # local files: detected from the first record when omitted
    phases: list[Literal[1, 2, 3]] | None = None  # restrict the phases this dataset feeds
    max_records: int | None = Field(None, ge=1)  # keep only the first N valid records (quick runs)

    @field_validator("phases")
    @classmethod
    def _phases_unique(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must list each phase 1, 2, 3 at most once, and at least one")
        return v


class DataConfig(Section):
    datasets: list[DatasetConfig] = Field(min_length=1)
    # Share of each dataset given to phase 1 (SFT), 2 (reward model), 3 (PPO), as in DeepSpeed-Chat.
    phase_ratios: tuple[float, float, float] = (2.0, 4.0, 4.0)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_eval_records: int | None = Field(None, ge=1)  # per dataset, after carving
    seed: int = 1234
    max_seq_len: int = Field(512, ge=8)
    max_prompt_len: int = Field(256, ge=4)
    overlong: Literal["truncate", "drop"] = "truncate"
    template: Literal["auto", "plain"] = "auto"  # auto: the tokenizer's chat template where it has one
    eos_token: str | None = None  # defaults to the tokenizer's EOS; must be a single token
    on_bad_record: Literal["skip", "error"] = "skip"
    cache_dir: str | None = None  # default: <user cache>/rlhfkit/data

    @field_validator("phase_ratios")
    @classmethod
    def _ratios(cls, v):
        if any(r < 0 for r in v):
            raise ValueError(f"ratios must not be negative, got {list(v)}")
        if sum(v) <= 0:
            raise ValueError(f"at least one ratio must be positive, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_len > self.max_seq_len - 2:
            raise ValueError(
                f"max_prompt_len ({self.max_prompt_len}) must leave room for a response: "
                f"at most max_seq_len - 2 = {self.max_seq_len - 2}"
            )
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique, repeated: {dupes}")
        return self


class RunConfig(Section):
    output_dir: str = "runs/default"
    seed: int = 42


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe, apply `a.b.c=value` overrides, validate. Errors name the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    try:
        raw = _expand_env(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, path, overrides)) from None


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = _list_item(node, part, key)
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else None
        if idx is None or idx > len(node):
            raise ConfigError(f"override {item!r}: {key} is not an index into a list of {len(node)}")
        node[idx:idx + 1] = [parsed]
    else:
        node[last] = parsed


def _list_item(node: list, part: str, key: str):
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index into a list of {len(node)}")
    return node[int(part)]


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value, where: str = ""):
    """Expand ${NAME} and ${NAME:-default} in string values; an unset NAME without default is an error."""
    if isinstance(value, str):
        def sub(m):
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set (or write ${{{m.group(1)}:-default}})")
        return _ENV_VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}.{i}") for i, v in enumerate(value)]
    return value


def format_validation_error(err: ValidationError, path: Path, overrides=()) -> str:
    lines = [f"{path}: invalid config ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    override_keys = {o.partition("=")[0].strip() for o in overrides}
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for the keys each section takes)"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        where = " [from command line]" if loc in override_keys else ""
        lines.append(f"  {loc}: {msg}{where}")
    return "\n".join(lines)


def save_resolved_config(cfg: Config, out_dir: Path, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config (defaults filled in) next to a stage's outputs."""
    from .paths import write_text_atomic

    out = Path(out_dir) / name
    write_text_atomic(out, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out

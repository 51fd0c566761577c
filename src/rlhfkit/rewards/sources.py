"""Reward sources on text, built from ppo.reward.sources (or eval.rewards): each is called on a batch of
decoded prompts, responses and the prompt records' metadata and returns one float per response.

Every call is checked here, whatever the source: an exception, a wrong count or a value that is not a
finite number becomes a RewardError naming the source, so no user function fails silently or with a bare
traceback. The `model` source (the trained reward model on token ids) is the trainer's, not built here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from . import verifiers
from .fields import RewardError, record_field
from .remote import RemoteReward


class TextRewardSource:
    """One configured source: `fn(prompts, responses, metadata) -> floats`, validated on every call.

    name: logged as reward/<name>; type: the config's type; weight: its factor in the summed reward;
    reads_generated: fn is given the responses as generated (special tokens kept) when the caller has them."""

    def __init__(self, name: str, type_: str, weight: float, fn: Callable, what: str | None = None,
                 reads_generated: bool = False):
        self.name, self.type, self.weight, self._fn, self.what = name, type_, float(weight), fn, what
        self.reads_generated = reads_generated

    def __repr__(self) -> str:
        return f"TextRewardSource(name={self.name!r}, type={self.type!r}, weight={self.weight})"

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict],
                 generated: list[str] | None = None) -> list[float]:
        """responses: decoded without special tokens; generated (optional): the same responses decoded with
        them (generated_texts), which a remote server reads (its EOS or end marker where a response ended)."""
        label = f"reward source {self.name!r}" + (f" ({self.what})" if self.what else "")
        if self.reads_generated and generated is not None:
            responses = generated
        try:
            values = self._fn(list(prompts), list(responses), list(metadata))
        except RewardError as e:
            raise RewardError(f"{label}: {e}") from None
        except Exception as e:  # a user's function: its failure is reported, not re-raised as a traceback
            raise RewardError(f"{label} raised {type(e).__name__}: {e}") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardError(f"{label} must return a list of numbers, one per response, and returned "
                              f"{_short(values)} ({e})") from None
        if len(values) != len(responses):
            raise RewardError(f"{label} returned {len(values)} values for {len(responses)} responses")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise RewardError(f"{label} returned a non-finite value ({values[bad[0]]}) for response {bad[0]}{more}")
        return values


def generated_texts(tokenizer, rollout) -> list[str]:
    """Each response of a rollout (input_ids, prompt_lens, lengths) decoded as generated, special tokens
    kept: it ends in the EOS or end marker where the response ended and not where it was cut at max length,
    as OpenRLHF's client sends it to a remote reward server."""
    return [tokenizer.decode(rollout.input_ids[i, int(rollout.prompt_lens[i]):int(rollout.lengths[i])],
                             skip_special_tokens=False) for i in range(len(rollout.lengths))]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _against_answer(check: Callable, key: str) -> Callable:
    def fn(prompts, responses, metadata):
        return [check(r, a) for r, a in zip(responses, record_field(metadata, key, "the reference answer"))]
    return fn


def _with_pattern(check: Callable, pattern: str) -> Callable:
    def fn(prompts, responses, metadata):
        return [check(r, pattern) for r in responses]
    return fn


def load_function(spec: str, setting: str, base_dir: str | Path | None = None) -> Callable:
    """"package.module:function" or "path/to/file.py:function" (relative to base_dir, default the working
    directory) → the function; ConfigError naming the setting when the module, file or function is missing."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"{setting}: {spec!r} is not \"package.module:function\" or \"path/to/file.py:function\"")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ConfigError(f"{setting}: file {path} not found (relative paths start at {base})")
        # hashlib, not hash(): str hashes are salted per process, and other processes (data-loader workers,
        # other ranks unpickling) must find the module under the same name
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        module_name = f"rlhfkit_reward_{digest}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise ConfigError(f"{setting}: importing {path} failed: {type(e).__name__}: {e}") from None
        where = str(path)
    else:
        module = _import(target, setting, base)
        where = f"module {target}"
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{setting}: {where} has no function {name!r}")
    if not callable(fn):
        raise ConfigError(f"{setting}: {name!r} in {where} is not a function")
    return fn


def _import(target: str, setting: str, base: Path):
    """importlib.import_module, retried with base (the working directory) on sys.path: the `rlhfkit`
    script does not put the working directory there, as `python -m` would."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if not _is_the_target(e, target):  # a module that the user's own module imports is missing
            raise ConfigError(f"{setting}: importing module {target!r} failed: {e}") from None
        first = e
    except Exception as e:
        raise ConfigError(f"{setting}: importing module {target!r} failed: {type(e).__name__}: {e}") from None
    sys.path.insert(0, str(base))
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if _is_the_target(e, target):
            raise ConfigError(f"{setting}: cannot import module {target!r} ({first}; nor from {base})") from None
        raise ConfigError(f"{setting}: importing module {target!r} failed: {e}") from None
    except Exception as e:
        raise ConfigError(f"{setting}: importing module {target!r} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(base))


def _is_the_target(e: ModuleNotFoundError, target: str) -> bool:
    return e.name is not None and (target == e.name or target.startswith(e.name + "."))


def _compile(pattern: str, setting: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{setting}: not a valid regular expression: {e}") from None


def build_text_sources(sources: list, *, base_dir: str | Path | None = None,
                       setting: str = "ppo.reward.sources") -> list[TextRewardSource]:
    """Every source of the list except `model` (the reward model is the trainer's), in order. Each is named
    by its `name`, else by its type, numbered when the type repeats ("python", "python_2"). `sources` are
    the config's RewardSource objects (dicts are validated into them). base_dir: where relative python
    paths start (default: the working directory); setting: the config key that errors name."""
    from ..config import RewardSource

    seen: Counter = Counter()
    out = []
    for i, s in enumerate(sources):
        where = f"{setting}[{i}]"
        if isinstance(s, dict):
            s = _validate(s, where, RewardSource)
        if s.type == "model":
            continue
        seen[s.type] += 1
        name = s.name or (s.type if seen[s.type] == 1 else f"{s.type}_{seen[s.type]}")
        if s.type == "python":
            fn, what = load_function(s.function, f"{where}.function", base_dir), f"python {s.function}"
        elif s.type == "gsm8k":
            fn, what = _against_answer(verifiers.gsm8k_reward, s.answer_key), f"gsm8k vs metadata {s.answer_key!r}"
        elif s.type == "exact":
            fn, what = _against_answer(verifiers.exact_reward, s.answer_key), f"exact vs metadata {s.answer_key!r}"
        elif s.type in ("regex", "format"):
            _compile(s.pattern, f"{where}.pattern")
            check = verifiers.regex_reward if s.type == "regex" else verifiers.format_reward
            fn, what = _with_pattern(check, s.pattern), f"{s.type} {s.pattern!r}"
        elif s.type == "remote":
            # its errors name the server's URL themselves
            fn, what = RemoteReward(s.url, s.timeout, s.retries, s.batch_size, s.label_key), None
        else:
            raise ConfigError(f"{where}: unknown reward source type {s.type!r}")
        # a remote server gets the query unchanged, as OpenRLHF sends it (docs/rewards.md)
        out.append(TextRewardSource(name, s.type, s.weight, fn, what, reads_generated=s.type == "remote"))
    names = [s.name for s in out]
    if "model" in names:
        raise ConfigError(f"{setting}: the name 'model' belongs to the reward model's source; choose another")
    if len(set(names)) != len(names):
        twice = Counter(names).most_common(1)[0][0]
        raise ConfigError(f"{setting}: two sources are named {twice!r}; set a different `name` on one of them")
    return out


def _validate(raw: dict, where: str, annotation):
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(annotation).validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"][1:])
        raise ConfigError(f"{where}{'.' + loc if loc else ''}: {first['msg']}") from None

"""Reward sources on text: built from ppo.reward.sources (or eval.rewards), each called on a batch of
decoded prompts, responses and the prompt records' metadata, returning one float per response.

Every call is checked here, whatever the source: an exception, a wrong count or a value that is not a
finite number becomes a RewardError naming the source, so no user function can fail silently or with a
bare traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections import Counter
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, RlhfkitError
from . import verifiers


class RewardError(RlhfkitError):
    """A reward source failed on a batch; the message names the source."""


class TextRewardSource:
    """One configured source: `fn(prompts, responses, metadata) -> floats`, validated on every call."""

    def __init__(self, name: str, type_: str, weight: float, fn: Callable, what: str):
        self.name, self.type, self.weight, self._fn, self.what = name, type_, weight, fn, what

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        label = f"reward source {self.name!r} ({self.what})"
        try:
            values = self._fn(prompts, responses, metadata)
        except RewardError as e:
            raise RewardError(f"{label}: {e}") from None
        except Exception as e:  # a user's function: its failure is reported, not re-raised as a traceback
            raise RewardError(f"{label} raised {type(e).__name__}: {e}") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise RewardError(f"{label} must return a list of numbers, one per response: {e}") from None
        if len(values) != len(responses):
            raise RewardError(f"{label} returned {len(values)} values for {len(responses)} responses")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardError(f"{label} returned a non-finite value ({values[bad[0]]}) for response {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}")
        return values


def _answers(metadata: list[dict], key: str) -> list:
    for i, m in enumerate(metadata):
        if key not in m:
            raise RewardError(f"prompt record {i} of the batch has no field {key!r} (its fields: {sorted(m)}); "
                              f"the prompt records must carry the reference answer as {key!r}")
    return [m[key] for m in metadata]


def _per_response(check, key: str):
    def fn(prompts, responses, metadata):
        return [check(r, a) for r, a in zip(responses, _answers(metadata, key))]
    return fn


def load_function(spec: str, setting: str) -> Callable:
    """"package.module:function" or "path/to/file.py:function" → the function; ConfigError naming the setting."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"{setting}: file {path} not found (relative paths start at {Path.cwd()})")
        module_spec = importlib.util.spec_from_file_location(f"rlhfkit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"{setting}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ConfigError(f"{setting}: cannot import module {target!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{setting}: {target} has no function {name!r}")
    return fn


def build_text_sources(sources: list, setting: str = "ppo.reward.sources") -> list[TextRewardSource]:
    """Every source of the list except `model` (the reward model is the trainer's), named by `name` or by
    type, numbered when a type repeats ("python", "python_2")."""
    from .remote import RemoteReward

    seen: Counter = Counter()
    out = []
    for i, s in enumerate(sources):
        if s.type == "model":
            continue
        seen[s.type] += 1
        name = s.name or (s.type if seen[s.type] == 1 else f"{s.type}_{seen[s.type]}")
        if s.type == "python":
            fn, what = load_function(s.function, f"{setting}[{i}].function"), f"python {s.function}"
        elif s.type == "gsm8k":
            fn, what = _per_response(verifiers.gsm8k_reward, s.answer_key), f"gsm8k answer vs {s.answer_key!r}"
        elif s.type == "exact":
            fn, what = _per_response(verifiers.exact_reward, s.answer_key), f"exact match of {s.answer_key!r}"
        elif s.type in ("regex", "format"):
            check = verifiers.regex_reward if s.type == "regex" else verifiers.format_reward
            fn = (lambda check, pattern: lambda p, responses, m: [check(r, pattern) for r in responses])(check, s.pattern)
            what = f"{s.type} {s.pattern!r}"
        elif s.type == "remote":
            fn, what = RemoteReward(s.url, s.timeout, s.retries, s.batch_size, s.label_key), f"remote {s.url}"
        else:
            raise ConfigError(f"{setting}[{i}]: unknown reward source type {s.type!r}")
        if s.type in ("regex", "format"):
            _compile(s.pattern, f"{setting}[{i}].pattern")
        out.append(TextRewardSource(name, s.type, s.weight, fn, what))
    names = [s.name for s in out]
    if "model" in names:
        raise ConfigError(f"{setting}: the name 'model' belongs to the reward model's source; choose another")
    if len(set(names)) != len(names):
        raise ConfigError(f"{setting}: two sources are named {Counter(names).most_common(1)[0][0]!r}; names must differ")
    return out


def _compile(pattern: str, setting: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{setting}: not a valid regular expression: {e}") from None

"""Environments: stateful multi-turn tasks with the gym-style contract that OpenEnv and TRL use.

A class named `package.module:Class`, `path/to/file.py:Class` or a built-in's name (`guess_number`; `openenv`, a
client of an OpenEnv server: agents/openenv_client.py), with

    reset(metadata: dict) -> list[dict]                            the messages that open the episode
    step(assistant_message: dict) -> (list[dict], float, bool)     the messages it answers with, the step's
                                                                   reward, whether the episode is over

One instance per episode, made without arguments; the prompt record's metadata reaches it through reset.
Every call is checked here, as reward sources are (rewards/sources.py): an exception, or a return value of the
wrong shape, becomes an EpisodeError naming the environment, the episode and the call, which stops the run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import ConfigError, RlhfkitError
from ..rewards.sources import load_function
from .openenv_client import environment_class

BUILTIN_ENVIRONMENTS = {"guess_number": "rlhfkit.agents.environments:GuessNumber"}


class EpisodeError(RlhfkitError):
    """An environment failed in an episode; the message names the environment, the episode and the cause."""


def load_environment(spec: str, setting: str, base_dir: str | Path | None = None, openenv=None) -> type:
    """A built-in's name, "package.module:Class" or "path/to/file.py:Class" (relative to base_dir, default the
    working directory) → the class; ConfigError naming the setting when it is missing or lacks reset/step.
    `openenv` (config.OpenEnvConfig, ppo.openenv): the server of `openenv`, bound to the class it gives."""
    if spec == "openenv":
        if openenv is None:
            raise ConfigError(f"{setting}: openenv needs its server's settings (ppo.openenv: url, observation_field)")
        return environment_class(openenv)
    if ":" not in spec and spec not in BUILTIN_ENVIRONMENTS:
        raise ConfigError(f"{setting}: {spec!r} is not a built-in environment ({', '.join(BUILTIN_ENVIRONMENTS)}, "
                          "openenv) nor \"package.module:Class\" or \"path/to/file.py:Class\"")
    cls = load_function(BUILTIN_ENVIRONMENTS.get(spec, spec), setting, base_dir)
    if not isinstance(cls, type):
        raise ConfigError(f"{setting}: {spec!r} is not a class (an environment is a class with reset and step "
                          "methods; one instance is made per episode)")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"{setting}: the class {spec!r} has no {' and no '.join(missing)} method "
                          "(reset(metadata) -> messages, step(assistant_message) -> (messages, reward, done))")
    return cls


class EnvironmentEpisode:
    """One episode: a new instance of the environment class, each call checked.

    name: the environment as configured (its spec), episode: the episode as the caller names it (e.g. "prompt
    12, sample 3"); both appear in every EpisodeError. `reward` sums the rewards of the steps so far."""

    def __init__(self, env_class: type, name: str, episode: str):
        self.name, self.episode = name, episode
        self.steps, self.reward, self.done = 0, 0.0, False
        self._env = self._call("creating it", env_class)

    def reset(self, metadata: dict) -> list[dict]:
        messages = self._call("reset", self._env.reset, metadata)
        problem = _messages_problem(messages)
        if problem or not messages:
            raise self._error("reset", f"must return the opening messages, a non-empty list of "
                              f"{{'role': str, 'content': str}}; {problem or 'it returned an empty list'}")
        return messages

    def step(self, assistant_message: dict) -> tuple[list[dict], float, bool]:
        """The environment's answer to one assistant message; `reward` and `done` are updated."""
        if self.done:
            raise RuntimeError(f"episode {self.episode} of {self.name!r} is over; step() was called again")
        self.steps += 1
        where = f"step {self.steps}"
        out = self._call(where, self._env.step, assistant_message)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise self._error(where, f"must return (messages, reward, done), returned {_short(out)}")
        messages, reward, done = out
        problem = _messages_problem(messages)
        if problem:
            raise self._error(where, f"returned messages that are not a list of {{'role': str, 'content': str}}; "
                                     f"{problem}")
        try:
            reward = float(reward)
        except (TypeError, ValueError):
            raise self._error(where, f"returned a reward that is not a number: {_short(reward)}") from None
        if not math.isfinite(reward):
            raise self._error(where, f"returned a non-finite reward ({reward})")
        if done not in (True, False):
            raise self._error(where, f"returned `done` that is not a boolean: {_short(done)}")
        self.reward += reward
        self.done = bool(done)
        return messages, reward, self.done

    def _call(self, where: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # the user's environment: its failure is reported, not re-raised as a traceback
            raise self._error(where, f"raised {type(e).__name__}: {e}") from None

    def _error(self, where: str, problem: str) -> EpisodeError:
        return EpisodeError(f"environment {self.name!r}, episode {self.episode}, {where}: {problem}")


def _messages_problem(messages) -> str | None:
    if not isinstance(messages, list):
        return f"got {_short(messages)}"
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {i} is {_short(m)}"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class GuessNumber:
    """Guess a whole number: each wrong guess is answered "higher" or "lower". metadata: `secret` (required),
    `low` (1), `high` (100), `max_guesses` (7). Reward 1 for the guess that finds it, else 0; the episode ends
    when it is found or the guesses run out. A reply's last integer is its guess; a reply without one uses up
    a guess."""

    def reset(self, metadata: dict) -> list[dict]:
        if "secret" not in metadata:
            raise ValueError(f"the prompt record has no field 'secret' (the number to guess); its fields: "
                             f"{sorted(metadata)}")
        self.secret = int(metadata["secret"])
        low, high = int(metadata.get("low", 1)), int(metadata.get("high", 100))
        self.left = int(metadata.get("max_guesses", 7))
        return [{"role": "user", "content": f"I am thinking of a whole number from {low} to {high}. Guess it: "
                                            f"reply with one number. You have {_guesses(self.left)}."}]

    def step(self, assistant_message: dict) -> tuple[list[dict], float, bool]:
        numbers = re.findall(r"-?\d+", assistant_message["content"])
        self.left -= 1
        if numbers and int(numbers[-1]) == self.secret:
            return [], 1.0, True
        if self.left == 0:
            return [{"role": "user", "content": f"No guesses left; it was {self.secret}."}], 0.0, True
        if not numbers:
            hint = "That is not a number."
        else:
            hint = "Higher." if int(numbers[-1]) < self.secret else "Lower."
        return [{"role": "user", "content": f"{hint} {_guesses(self.left)} left."}], 0.0, False


def _guesses(n: int) -> str:
    return f"{n} guess" if n == 1 else f"{n} guesses"

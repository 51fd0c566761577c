"""Multi-turn rollouts: episodes in which tools or an environment answer the model between its turns.

Each turn samples the live episodes only (in generation batches, each row with its own seed), then:
a reply with tool calls has them run (every episode's calls of the turn together, under one deadline:
agents/runner.py) and their results appended as tool messages; a reply without calls goes to the
environment's step where there is one, else it is the answer. An episode ends on its answer, the
environment's `done`, max_turns or the token budget (new tokens after the prompt, the model's and the
added ones), and always with a model turn: an addition that would leave no room for the model is not made.

An episode is kept as token ids (agents/episode.py): the ids the model sampled as they came, with their
sampling log-probs, and the encoded template text of what was added. The Rollout it becomes has the
episode's first model token as its first response token and an action mask marking the model's tokens:
loss, KL and advantages cover those only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..agents.calls import parse_tool_calls
from ..agents.environments import EnvironmentEpisode, EpisodeError
from ..agents.episode import EpisodeTemplate, EpisodeTokens
from ..agents.runner import ERROR_KINDS, run_calls
from ..agents.tools import Tool
from ..engine.generation import SamplingConfig, StaticDecoder, generate
from ..sequences import pad_right
from .sampling import Rollout

END_REASONS = ("answer", "done", "max_turns", "budget")


@dataclass
class EpisodeRecord:
    """What one episode did, for the step's metrics. calls: calls run; valid_calls: those that returned a
    result; errors: the others by kind (runner.ERROR_KINDS); end: one of END_REASONS."""

    turns: int = 0
    calls: int = 0
    valid_calls: int = 0
    errors: Counter = field(default_factory=Counter)
    model_tokens: int = 0
    added_tokens: int = 0
    end: str = ""
    environment_reward: float = 0.0


class _Episode:
    def __init__(self, ids: list[int], name: str, seed: int, budget: int, env: EnvironmentEpisode | None):
        self.tokens, self.name, self.seed, self.budget, self.env = EpisodeTokens(ids), name, seed, budget, env
        self.logprobs: list[float] = []  # one per token after the prompt, 0 on added ones
        self.record = EpisodeRecord()
        self.live, self.ended, self.stop, self.calls = True, False, None, []

    @property
    def room(self) -> int:
        return self.budget - (len(self.tokens.ids) - self.tokens.prompt_len)

    def finish(self, reason: str) -> None:
        self.live, self.record.end = False, reason


class EpisodeRunner:
    """Runs episodes with `tools` (name → Tool) and/or an environment class, named `environment_name` in
    errors. max_tokens: the budget of new tokens per episode; tool_timeout: the deadline of a turn's calls.
    system_prompt and stop_ids: as the data stage renders prompts and rollouts stop (EpisodeTemplate)."""

    def __init__(self, tokenizer, tools: dict[str, Tool], environment: type | None, environment_name: str | None,
                 max_turns: int, max_tokens: int, tool_timeout: float, system_prompt: str | None,
                 stop_ids: list[int]):
        self.tok, self.tools, self.environment, self.environment_name = tokenizer, tools, environment, environment_name
        self.max_turns, self.max_tokens, self.tool_timeout = max_turns, max_tokens, tool_timeout
        self.template = EpisodeTemplate(tokenizer, [t.schema for t in tools.values()], system_prompt, stop_ids)

    def prompt_ids(self, prompt) -> list[int]:
        """A prepared prompt's ids as an episode starts from them: with the tools described (ValueError where
        they cannot be: EpisodeTemplate.prompt)."""
        ids = [int(i) for i in prompt]
        return self.template.prompt(ids) if self.tools else ids

    def run(self, model, prompts: list, metadata: list[dict], names: list[str], seeds: list[int], batch_size: int,
            pad_id: int, stop_ids: list[int], sampling: SamplingConfig, return_logprobs: bool = False,
            static: StaticDecoder | None = None) -> tuple[Rollout, list[EpisodeRecord]]:
        """One episode per prompt; names[i] names episode i in its errors (EpisodeError: an environment failed, or
        the chat template refused an environment's or the tools' messages).

        `static` decodes the first turn only, whose batches are those of single-turn rollouts. Later turns run the
        dynamic loop, which samples the same tokens: their batches (the live episodes) and widths (the episodes
        so far) change from turn to turn and step to step, and a static cache (on a GPU, a compile) kept per
        shape would pile up."""
        episodes = [self._start(*args) for args in zip(prompts, metadata, names, seeds)]
        for turn in range(self.max_turns):
            live = [e for e in episodes if e.live]
            for start in range(0, len(live), batch_size):
                chunk = live[start:start + batch_size]
                turn_sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, max(e.room for e in chunk)))
                gen = generate(model, [np.asarray(e.tokens.ids) for e in chunk], pad_id, stop_ids, turn_sampling,
                               [turn_seed(e.seed, turn) for e in chunk], return_logprobs, static if turn == 0 else None)
                for row, e in enumerate(chunk):
                    self._take_turn(e, gen, row, last=turn == self.max_turns - 1)
            self._answer_calls([e for e in live if e.calls])
        return self._rollout(episodes, pad_id, return_logprobs), [e.record for e in episodes]

    def _start(self, prompt, metadata: dict, name: str, seed: int) -> _Episode:
        ids = self.prompt_ids(prompt)
        env = None
        if self.environment is not None:
            env = EnvironmentEpisode(self.environment, self.environment_name, name)
            opening = env.reset(metadata)
            try:
                ids = self.template.opening(ids, opening)
            except ValueError as e:
                raise EpisodeError(f"environment {self.environment_name!r}, episode {name}, reset: its opening "
                                   f"messages cannot follow the prompt: {e}") from None
        return _Episode(ids, name, seed, self.max_tokens, env)

    def _take_turn(self, e: _Episode, gen, row: int, last: bool) -> None:
        ids = gen.response_ids[row, :int(gen.response_lengths[row])].tolist()
        ended = bool(gen.ended[row]) and len(ids) <= e.room
        ids = ids[:e.room]  # the budget cuts the turn where it runs out
        e.tokens.add_sampled(ids)
        e.logprobs += gen.response_logprobs[row, :len(ids)].tolist() if gen.response_logprobs is not None else [0.0] * len(ids)
        e.record.turns += 1
        e.record.model_tokens += len(ids)
        e.ended, e.stop = ended, (ids[-1] if ended else None)
        text = self.tok.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        calls = parse_tool_calls(text) if self.tools else []
        if calls:
            if last or e.room == 0:
                e.finish("max_turns" if last else "budget")
            else:
                e.calls = calls
        elif e.env is not None:
            messages, _, done = e.env.step({"role": "assistant", "content": text})
            e.record.environment_reward = e.env.reward
            if done:
                e.finish("done")
            elif last:
                e.finish("max_turns")
            else:
                self._add(e, messages, f"environment {self.environment_name!r}, episode {e.name}, step {e.env.steps}: "
                                       "its messages")
        else:
            e.finish("answer")

    def _answer_calls(self, calling: list[_Episode]) -> None:
        """Every call of this turn, of every episode, run at once under one deadline; each episode gets its
        results as tool messages, in the order of its calls."""
        if not calling:
            return
        observations = iter(run_calls([c for e in calling for c in e.calls], self.tools, self.tool_timeout))
        for e in calling:
            answers = [next(observations) for _ in e.calls]
            e.calls = []
            e.record.calls += len(answers)
            e.record.valid_calls += sum(o.error is None for o in answers)
            e.record.errors.update(o.error for o in answers if o.error is not None)
            self._add(e, [o.message for o in answers], f"episode {e.name}, turn {e.record.turns}: the tool results")

    def _add(self, e: _Episode, messages: list[dict], what: str) -> None:
        """The template's continuation after the model's turn, unless it leaves no room for another turn. `what`
        names the messages in the EpisodeError raised where the chat template refuses them: the run stops as on
        an environment's failure, not with a traceback in the middle of a step."""
        if e.room == 0:
            e.finish("budget")
            return
        try:
            ids = self.template.after_turn(messages, e.stop)
        except ValueError as err:
            raise EpisodeError(f"{what} cannot follow the model's turn: {err}") from None
        if len(ids) >= e.room:
            e.finish("budget")
            return
        e.tokens.add_context(ids)
        e.logprobs += [0.0] * len(ids)
        e.record.added_tokens += len(ids)

    def _rollout(self, episodes: list[_Episode], pad_id: int, with_logprobs: bool) -> Rollout:
        ids, lengths = pad_right([np.asarray(e.tokens.ids) for e in episodes], pad_id)
        prompt_lens = torch.tensor([e.tokens.prompt_len for e in episodes])
        response_lengths = lengths - prompt_lens
        width = int(response_lengths.max())
        own = torch.zeros(len(episodes), width, dtype=torch.bool)
        logprobs = torch.zeros(len(episodes), width)
        for i, e in enumerate(episodes):
            n = int(response_lengths[i])
            own[i, :n] = torch.tensor(e.tokens.own[e.tokens.prompt_len:])
            logprobs[i, :n] = torch.tensor(e.logprobs)
        ended = torch.tensor([e.ended for e in episodes])
        return Rollout(ids, lengths, prompt_lens, response_lengths, ended, logprobs if with_logprobs else None, own)


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of an episode's turn: its own seed for the first, one derived from it for the others."""
    return seed if turn == 0 else int(np.random.default_rng([seed, turn]).integers(2**62))


def episode_sums(records: list[EpisodeRecord]) -> dict[str, float]:
    """Sums over a batch's episodes that the step's metrics are made of (summed over processes, then made
    per-episode means, rates or counts by episode_metrics)."""
    sums = Counter({"episodes": len(records)})
    for r in records:
        sums.update({"turns": r.turns, "calls": r.calls, "valid_calls": r.valid_calls,
                     "tokens": r.model_tokens + r.added_tokens, "model_tokens": r.model_tokens,
                     f"end/{r.end}": 1, **{f"errors/{k}": n for k, n in r.errors.items()}})
    return {k: float(sums[k]) for k in episode_sum_keys()}


def episode_sum_keys() -> list[str]:
    return (["episodes", "turns", "calls", "valid_calls", "tokens", "model_tokens"]
            + [f"end/{r}" for r in END_REASONS] + [f"errors/{k}" for k in ERROR_KINDS])


def episode_metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Per episode: turns, tokens after the prompt (and the model's share), tool calls and valid calls; the
    valid-call rate (valid / calls; left out when no call was made: it has no value then); each end reason's
    share of the episodes; the error observations of each kind, counted."""
    n = max(sums["episodes"], 1.0)
    out = {"episode/turns": sums["turns"] / n, "episode/tokens": sums["tokens"] / n,
           "episode/model_tokens": sums["model_tokens"] / n,
           "tools/calls_per_episode": sums["calls"] / n, "tools/valid_calls_per_episode": sums["valid_calls"] / n,
           **{f"episode/end_{r}": sums[f"end/{r}"] / n for r in END_REASONS},
           **{f"tools/errors/{k}": sums[f"errors/{k}"] for k in ERROR_KINDS}}
    if sums["calls"]:
        out["tools/valid_call_rate"] = sums["valid_calls"] / sums["calls"]
    return {prefix + k: v for k, v in out.items()}


def episode_runner(p, tokenizer, template: str, system_prompt, stop_ids, max_tokens: int) -> EpisodeRunner:
    """The RL loop's and eval's runner for `p` (the ppo section): its tools and environment loaded, every
    problem a ConfigError naming the setting. Episodes continue a conversation through the chat template."""
    from ..agents.environments import load_environment
    from ..agents.tools import load_tools
    from ..errors import ConfigError

    setting = "ppo.tools" if p.tools else "ppo.environment"
    if template == "plain" or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{setting}: episodes continue a conversation through the tokenizer's chat template, "
                          "but the prompts are rendered in the plain format (data.template: plain, or a tokenizer "
                          "without a chat template)")
    tools = load_tools(p.tools, "ppo.tools")
    environment = load_environment(p.environment, "ppo.environment", openenv=p.openenv) if p.environment else None
    try:
        return EpisodeRunner(tokenizer, tools, environment, p.environment, p.max_turns, max_tokens,
                             p.tool_timeout_s, system_prompt, stop_ids)
    except ValueError as e:
        raise ConfigError(f"{setting}: {e}") from None

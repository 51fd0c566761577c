"""`rlhfkit eval CONFIG`: the aligned model against the SFT model on held-out prompts.

For every prompt set (the run's held-out phase-3 prompts, and prompt files such as
../shared/data/eval/eval_prompts.jsonl.gz), both models answer every prompt with the same sampling
settings and the same per-prompt seed; the reward model (and an optional second judge) scores each
response at its last token, and every text reward of eval.rewards (e.g. GSM8K accuracy, format rate) scores
it from its text and the prompt record's metadata (a prompt file's other fields, or the phase-3 record's);
when a weight other than 1 is set, their weighted sum is reported too ("weighted_sum", the RL reward's form).
Every one of them is a "judge" below, with the same figures. A run without a reward model (a verifiable-reward
recipe) is judged by its text rewards alone, and says so. Reported per set: mean score of each model, the
paired gain and the win rate
of the policy over the baseline (ties count half), the gain at equal length, KL of the policy to the baseline
on the policy's own samples (Σ log π − log π_ref per response; the baseline is the PPO reference), response
lengths and EOS rates; 95% bootstrap intervals over prompts and flags (stats.py, docs/evaluation.md).
Also: perplexity of both models on the phase-1 eval split and RM accuracy on the phase-2 eval pairs.
A judge whose tokenizer differs from the text's scores the decoded text re-encoded with its own tokenizer
(ppo.retokenize, as in PPO). Every generation is kept in eval/generations.jsonl; the summary is eval/eval.json.

Where the run's ppo section sets tools or an environment, both models run the RL loop's episodes instead of
answering once (rollout/episodes.py, with ppo's tools, environment, max_turns, max_episode_tokens and
tool_timeout_s; eval.sampling per turn): the same prompts, per-prompt seeds and tools. The judges score the
whole episode as the RL reward does, the environment's reward is the judge `environment`, lengths and KL
count the model's own tokens, and each set also reports the tool-call rate, valid-call rate and turns per
episode of both models with paired intervals (episode_statistics); generations.jsonl keeps each episode's turns.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..agents.calls import parse_tool_calls
from ..config import Config
from ..data.prepare import load_phase, prepare
from ..data.readers import iter_file_records
from ..data.records import BadRecord, to_example
from ..data.render import Renderer, build_prompts
from ..engine import distributed as D
from ..engine.generation import decoder_for, resolve_decoding
from ..engine.precision import DTYPES, cast_params, resolve_precision, why_auto
from ..errors import ConfigError, DataError
from ..models.loading import load_causal_lm, load_tokenizer
from ..paths import write_text_atomic
from ..train.batching import Blend, collate_pairs, collate_sft
from ..train.budget import StageBudget
from ..models.configs import model_config_for
from ..train.common import TokenLogprobLM
from ..rollout.episodes import EpisodeRecord, EpisodeRunner, episode_runner
from ..rollout.sampling import Rollout, sample_rollouts, sampling_for
from ..rollout.scoring import RewardScorer, actor_logprobs, load_reward_model, tokenizer_pair
from ..train.reward import rm_stage_dir
from ..train.sft import sft_stage_dir
from ..train.starts import actor_source
from ..rewards.sources import build_text_sources, generated_texts
from .stats import MIN_IDENTIFIABLE_SHARE, Bootstrap, fmt, fmt_interval, set_statistics


def eval_dir(cfg: Config) -> Path:
    return cfg.output_dir / "eval"


def aligned_final(cfg: Config) -> Path:
    return cfg.output_dir / cfg.pipeline.alignment / "final"


def _model_path(given: str | None, default: Path, key: str) -> str:
    if given:
        return given
    if not (default / "config.json").is_file():
        raise ConfigError(f"eval needs {default} (run its stage first) or `{key}` in the config")
    return str(default)


def policy_start(cfg: Config) -> str:
    """The model the aligned stage started from (PPO's reference, DPO's start): eval's default baseline."""
    from ..train.dpo import dpo_start_model

    start = actor_source(cfg) if cfg.pipeline.alignment == "ppo" else dpo_start_model(cfg)
    sft_final = sft_stage_dir(cfg) / "final"
    return _model_path(None, sft_final, "eval.baseline") if start == str(sft_final) else start


METRICS = {"gsm8k": "accuracy", "exact": "exact-match rate", "format": "format rate", "regex": "match rate"}
WEIGHTED_SUM = "weighted_sum"  # the judge that sums the text rewards by weight, when a weight is set
ENVIRONMENT = "environment"  # the judge that is an episode's reward from ppo.environment


def required_fields(sources) -> list[tuple[int, str, str]]:
    """(index in eval.rewards, type, metadata field) for every field a configured text reward reads."""
    out = []
    for i, s in enumerate(sources):
        key = s.answer_key if s.type in ("gsm8k", "exact") else s.label_key if s.type == "remote" else None
        if key is not None:
            out.append((i, s.type, key))
    return out


def _check_fields(fields, metadata: dict, where: str) -> None:
    for i, kind, key in fields:
        if key not in metadata:
            raise DataError(f"{where}: eval.rewards[{i}] ({kind}) reads the prompt record's field {key!r}, which "
                            f"this record lacks (its other fields: {sorted(metadata)})")


def prompt_sets(cfg: Config, renderer: Renderer) -> dict[str, list[dict]]:
    """name → prompt rows {prompt_ids (rendered, left-truncated like phase-3 data), metadata (the record's
    other fields)}, at most eval.max_prompts each. Every record must carry the fields eval.rewards read."""
    out, origin = {}, {}
    fields = required_fields(cfg.eval.rewards)
    for spec in cfg.eval.prompt_sets:
        name = "phase3_eval" if spec == "phase3" else Path(spec).name.split(".")[0]
        if name in out:
            raise ConfigError(f"eval.prompt_sets: {spec!r} and {origin[name]!r} would both be reported as the set "
                              f"{name!r}; give each prompt file a different name")
        origin[name] = spec
        out[name] = _phase3_rows(cfg, fields) if spec == "phase3" else _file_rows(cfg, Path(spec), renderer, fields)
        if not out[name]:
            raise DataError(f"eval.prompt_sets: {spec} gives no prompt to evaluate")
    return out


def _phase3_rows(cfg: Config, fields) -> list[dict]:
    rows = []
    for dataset, table in load_phase(cfg.output_dir / "data", 3, "eval"):
        for i in range(min(len(table), cfg.eval.max_prompts - len(rows))):
            row = table.row(i)
            row.setdefault("metadata", {})  # data prepared before prompts carried metadata
            _check_fields(fields, row["metadata"], f"dataset {dataset!r}, phase-3 eval prompt {i}")
            rows.append(row)
    return rows


def _file_rows(cfg: Config, path: Path, renderer: Renderer, fields) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"eval.prompt_sets: {path} not found")
    examples, skipped = [], []
    for i, (where, raw) in enumerate(iter_file_records(path)):
        try:
            if isinstance(raw, BadRecord):
                raise raw
            ex = to_example(raw, "prompt", where, i)
        except BadRecord as bad:
            if cfg.data.on_bad_record == "error":
                raise DataError(f"eval.prompt_sets: {bad} (set data.on_bad_record=skip to skip such records)") from None
            skipped.append(bad)
            continue
        _check_fields(fields, ex.metadata, where)
        examples.append(ex)
        if len(examples) >= cfg.eval.max_prompts:
            break
    table, stats = build_prompts(examples, renderer)
    dropped = [f"{b.where}: {b.detail}" for b in skipped] + [f"{d['where']}: {d['detail']}" for d in stats.dropped_examples]
    if dropped:
        n = len(skipped) + sum(stats.dropped.values())
        print(f"eval: {path.name}: skipped {n} record(s), first: {dropped[0]}", flush=True)
    return [table.row(i) for i in range(len(table))]


class Comparison:
    def __init__(self, cfg: Config):
        cfg = self.cfg = resolve_precision(cfg)
        e = self.e = cfg.eval
        D.init_distributed()
        self.device = D.device()
        self.policy_path = _model_path(e.policy, aligned_final(cfg), "eval.policy")
        self.baseline_path = e.baseline or policy_start(cfg)
        self.reward_path = self._reward_path()
        # built before any model loads, so a bad source fails in seconds
        self.text_rewards = build_text_sources(e.rewards, setting="eval.rewards")
        taken = {"rm": "a reward-model judge", "judge2": "a reward-model judge",
                 WEIGHTED_SUM: "the weighted sum of eval.rewards", ENVIRONMENT: "the environment's reward"}
        clash = sorted({s.name for s in self.text_rewards} & set(taken))
        if clash:
            raise ConfigError(f"eval.rewards: the name {clash[0]!r} is taken by {taken[clash[0]]}; choose another")
        # a weight only means something in a sum: reported when one is set (it is not ignored)
        self.weighted = any(s.weight != 1.0 for s in self.text_rewards)
        self.tokenizer = load_tokenizer(model_config_for(cfg, self.policy_path))
        self.data_tokenizer = load_tokenizer(cfg.model)  # the one that encoded the run's prepared data
        dtype = DTYPES[e.dtype]
        decoding = resolve_decoding(e.decoding)
        if D.is_main():
            print(f"eval: precision {e.dtype} (auto: {why_auto()}), decoding {decoding}", flush=True)
        self.policy = self._lm(self.policy_path, dtype)
        self.baseline = self._lm(self.baseline_path, dtype)
        self.static = {m: decoder_for(m, decoding, "eval.decoding") for m in (self.policy, self.baseline)}
        judge_paths = {**({"rm": self.reward_path} if self.reward_path else {}),
                       **({"judge2": e.second_judge} if e.second_judge else {})}
        self.judges = {name: self._judge(path, dtype) for name, path in judge_paths.items()}
        self.sampling, self.stop_ids = sampling_for(e.sampling, self.tokenizer)
        self.episodes = self._episode_runner() if cfg.ppo.episodes else None
        self.samples: dict[str, dict] = {}  # per set: each prompt's scores, lengths, EOS and KL (for the pool)

    @property
    def judge_names(self) -> list[str]:
        return (list(self.judges) + [s.name for s in self.text_rewards] + ([WEIGHTED_SUM] if self.weighted else [])
                + ([ENVIRONMENT] if self.cfg.ppo.environment else []))

    def _episode_runner(self) -> EpisodeRunner:
        """The RL loop's episodes, for both models: ppo's tools, environment and episode settings, each turn
        sampled with eval.sampling (so the default budget is 2 × max_turns × eval.sampling.max_new_tokens)."""
        p, cfg = self.cfg.ppo, self.cfg
        budget = p.max_episode_tokens or 2 * p.max_turns * self.e.sampling.max_new_tokens
        return episode_runner(p, self.tokenizer, cfg.data.template, cfg.data.system_prompt, self.stop_ids, budget)

    def episode_summary(self) -> dict | None:
        """eval.json's description of the episodes both models ran (None: one reply each)."""
        if self.episodes is None:
            return None
        p = self.cfg.ppo
        return {"tools": list(self.episodes.tools), "environment": p.environment, "max_turns": p.max_turns,
                "max_episode_tokens": self.episodes.max_tokens, "tool_timeout_s": p.tool_timeout_s}

    def check_episode_prompts(self, sets: dict[str, list[dict]]) -> None:
        """Every prompt takes the tools' description (before anything is sampled): a config error naming it."""
        if self.episodes is None or not self.episodes.tools:
            return
        for name, rows in sets.items():
            for i, row in enumerate(rows):
                try:
                    self.episodes.prompt_ids(row["prompt_ids"])
                except ValueError as e:
                    raise ConfigError(f"ppo.tools: eval prompt set {name!r}, prompt {i}: {e}") from None

    def text_reward_summary(self) -> list[dict]:
        """eval.json's description of each text judge: name, type, weight and what its mean is."""
        out = [{"name": s.name, "type": s.type, "weight": s.weight, "metric": METRICS.get(s.type, "mean reward")}
               for s in self.text_rewards]
        if self.weighted:
            out.append({"name": WEIGHTED_SUM, "type": "sum", "weight": None, "metric": "weighted sum of "
                        + " + ".join(f"{s.weight:g}·{s.name}" for s in self.text_rewards)})
        return out

    def _reward_path(self) -> str | None:
        """eval.reward_model, else ppo.reward_model, else the RM stage's output; None when none is given or
        trained and eval.rewards (or ppo.environment's reward) judges alone."""
        e, cfg = self.e, self.cfg
        given = e.reward_model or cfg.ppo.reward_model
        default = rm_stage_dir(cfg) / "final"
        if given is None and (e.rewards or cfg.ppo.environment) and not (default / "config.json").is_file():
            return None
        return _model_path(given, default, "eval.reward_model (or eval.rewards, to judge by text alone)")

    def _lm(self, path: str, dtype):
        lm = load_causal_lm(model_config_for(self.cfg, path), dtype="float32")
        return cast_params(lm, dtype, self.device).eval().requires_grad_(False)

    def _judge(self, path: str, dtype) -> RewardScorer:
        """Scores the policy's rollouts; built as PPO builds its reward (retokenizing where tokenizers differ)."""
        rm = cast_params(load_reward_model(path, self.cfg), dtype, self.device)
        return RewardScorer(rm.eval().requires_grad_(False),
                            tokenizer_pair(self.cfg, self.tokenizer, f"eval: the policy ({self.policy_path})", path,
                                           "the judge"))

    @torch.no_grad()
    def answer(self, model, prompts: list[np.ndarray], start: int = 0):
        """Rollouts of `model` on the prompts (per-prompt seeds, by index in the set, shared by both models)."""
        seeds = [self.e.seed * 1_000_003 + start + j for j in range(len(prompts))]
        return sample_rollouts(model, prompts, seeds, self.e.batch_size, self.tokenizer.pad_token_id, self.stop_ids,
                               self.sampling, static=self.static[model])

    @torch.no_grad()
    def run_episodes(self, model, prompts: list[np.ndarray], metadata: list[dict], start: int, where: str):
        """answer() for episodes: the same per-prompt seeds; `where` names the set and model in an environment's
        errors. Returns the rollout (as a one-part list) and each episode's record."""
        seeds = [self.e.seed * 1_000_003 + start + j for j in range(len(prompts))]
        names = [f"{where} prompt {start + j}" for j in range(len(prompts))]
        rollout, records = self.episodes.run(model, prompts, metadata, names, seeds, self.e.batch_size,
                                             self.tokenizer.pad_token_id, self.stop_ids, self.sampling,
                                             static=self.static[model])
        return [rollout], records

    @torch.no_grad()
    def score_parts(self, parts, metadata: list[dict], records: list[EpisodeRecord] | None = None
                    ) -> dict[str, torch.Tensor]:
        out = {name: torch.cat([judge(p.to(self.device)).float().cpu() for p in parts]) for name, judge in self.judges.items()}
        if self.cfg.ppo.environment:
            out[ENVIRONMENT] = torch.tensor([r.environment_reward for r in records], dtype=torch.float32)
        if self.text_rewards:
            prompts = [self._text(p, k, prompt=True) for p in parts for k in range(len(p.lengths))]
            responses = [self._text(p, k) for p in parts for k in range(len(p.lengths))]
            generated = [g for p in parts for g in generated_texts(self.tokenizer, p)]  # as a remote server reads them
            for source in self.text_rewards:
                out[source.name] = torch.tensor(source(prompts, responses, metadata, generated), dtype=torch.float32)
            if self.weighted:
                out[WEIGHTED_SUM] = sum(s.weight * out[s.name] for s in self.text_rewards)
        return out

    @torch.no_grad()
    def kl_to_baseline(self, parts) -> torch.Tensor:
        """[B] Σ log π − log π_ref over the policy's own tokens of each response (of an episode: not what tools
        or the environment added)."""
        out = []
        for p in parts:  # the samples come from the tempered policy: measure that one
            p = p.to(self.device)
            diff = (actor_logprobs(TokenLogprobLM(self.policy), p, self.e.sampling.temperature)
                    - actor_logprobs(TokenLogprobLM(self.baseline), p, self.e.sampling.temperature))
            out.append(torch.where(p.response_mask(), diff, 0.0).sum(1).float().cpu())
        return torch.cat(out)

    def compare_set(self, name: str, rows: list[dict], sink, planner: "PromptPlanner | None" = None) -> dict:
        """Both models answer (or run their episodes) batch by batch, judged as they go; a planner may stop the
        set early."""
        pol, base, scored, kls, metas = [], [], [], [], []
        records: dict[str, list[EpisodeRecord]] = {"final": [], "sft": []}
        for i in range(0, len(rows), self.e.batch_size):
            if planner is not None and i >= planner.cap:
                break
            t0 = time.perf_counter()
            chunk = [r["prompt_ids"] for r in rows[i:i + self.e.batch_size]]
            metadata = [r.get("metadata", {}) for r in rows[i:i + self.e.batch_size]]
            metas += metadata
            if self.episodes is None:
                p, b, p_rec, b_rec = self.answer(self.policy, chunk, i), self.answer(self.baseline, chunk, i), [], []
            else:
                p, p_rec = self.run_episodes(self.policy, chunk, metadata, i, f"{name} (final)")
                b, b_rec = self.run_episodes(self.baseline, chunk, metadata, i, f"{name} (sft)")
            pol, base = pol + p, base + b
            records["final"] += p_rec
            records["sft"] += b_rec
            scored.append((self.score_parts(p, metadata, p_rec), self.score_parts(b, metadata, b_rec)))
            kls.append(self.kl_to_baseline(p))
            if planner is not None:
                planner.timed(len(chunk), time.perf_counter() - t0)
        pol_scores = {j: torch.cat([s[0][j] for s in scored]) for j in self.judge_names}
        base_scores = {j: torch.cat([s[1][j] for s in scored]) for j in self.judge_names}
        kl = torch.cat(kls)
        # the model's own tokens (of an episode: not what tools or the environment added)
        lengths = {label: torch.cat([p.response_mask().sum(1) for p in parts]) for label, parts in (("final", pol), ("sft", base))}
        samples = {"final": {j: v.numpy() for j, v in pol_scores.items()},
                   "sft": {j: v.numpy() for j, v in base_scores.items()},
                   "final_length": lengths["final"].numpy(), "sft_length": lengths["sft"].numpy(),
                   "final_ended": torch.cat([p.ended for p in pol]).numpy(),
                   "sft_ended": torch.cat([p.ended for p in base]).numpy(), "kl": kl.numpy()}
        if self.episodes is not None:
            for side, recs in records.items():
                for key in EPISODE_COUNTS:
                    samples[f"{side}_{key}"] = np.array([getattr(r, key) for r in recs], dtype=float)
        self.samples[name] = samples
        stats = summarize(samples, self.e.seed)
        i = 0
        for pp, bp in zip(pol, base):
            for k in range(len(pp.lengths)):
                episodes = {} if self.episodes is None else {
                    f"{side}_episode": self._episode(r, k, records[side][i]) for side, r in (("sft", bp), ("final", pp))}
                sink.write(json.dumps({
                    "set": name, "index": i, "prompt": self._text(pp, k, prompt=True), "metadata": metas[i],
                    "sft": self._text(bp, k), "final": self._text(pp, k),
                    **{f"{j}_sft": float(base_scores[j][i]) for j in self.judge_names},
                    **{f"{j}_final": float(pol_scores[j][i]) for j in self.judge_names},
                    "kl_to_sft": float(kl[i]), "final_length": int(lengths["final"][i]),
                    "sft_length": int(lengths["sft"][i]), "final_ended": bool(pp.ended[k]), "sft_ended": bool(bp.ended[k]),
                    **episodes,
                }) + "\n")
                i += 1
        return stats

    def _episode(self, r: Rollout, k: int, record: EpisodeRecord) -> dict:
        """An episode for generations.jsonl: its counts, how it ended, and its turns in order, each {role, text}:
        `model` (its own tokens, special tokens dropped; `calls` is how many tool calls it wrote), then what
        followed it as the template wrote it (special tokens kept): `tool` after a turn with calls, else
        `environment`."""
        n = int(r.response_lengths[k])
        ids = r.input_ids[k, int(r.prompt_lens[k]):int(r.prompt_lens[k]) + n].tolist()
        own = r.response_mask()[k, :n].tolist()
        turns, start = [], 0
        for end in range(1, n + 1):
            if end == n or own[end] != own[start]:
                if own[start]:
                    text = self.tokenizer.decode(ids[start:end], skip_special_tokens=True)
                    calls = len(parse_tool_calls(text)) if self.episodes.tools else 0
                    turns.append({"role": "model", "text": text, "calls": calls})
                else:
                    role = "tool" if turns and turns[-1]["calls"] else "environment"
                    turns.append({"role": role, "text": self.tokenizer.decode(ids[start:end])})
                start = end
        return {"turns": record.turns, "calls": record.calls, "valid_calls": record.valid_calls,
                "errors": dict(record.errors), "end": record.end, "messages": turns}

    def _text(self, r, k: int, prompt: bool = False) -> str:
        pl, n = int(r.prompt_lens[k]), int(r.lengths[k])
        ids = r.input_ids[k, :pl] if prompt else r.input_ids[k, pl:n]
        return self.tokenizer.decode(ids, skip_special_tokens=not prompt)

    @torch.no_grad()
    def perplexity(self, model) -> float | None:
        rows = Blend([t for _, t in load_phase(self.cfg.output_dir / "data", 1, "eval")])
        if len(rows) == 0:
            return None
        nll = count = 0.0
        lm = TokenLogprobLM(model)
        for i in range(0, len(rows), self.e.batch_size):
            batch = collate_sft([rows.row(j) for j in range(i, min(i + self.e.batch_size, len(rows)))],
                                self.tokenizer.pad_token_id)
            lp, _ = lm(batch["input_ids"].to(self.device), batch["lengths"].to(self.device),
                       batch["loss_mask"].to(self.device))
            nll, count = nll - float(lp.float().sum()), count + lp.numel()
        return math.exp(nll / max(count, 1))

    @torch.no_grad()
    def rm_accuracy(self) -> float | None:
        """Share of the phase-2 eval pairs whose chosen response the RM scores higher. The pairs are in the
        data tokenizer's ids: a judge with another tokenizer scores them re-encoded with its own."""
        rows = Blend([t for _, t in load_phase(self.cfg.output_dir / "data", 2, "eval")])
        if len(rows) == 0 or "rm" not in self.judges:
            return None
        tok = self.data_tokenizer
        judge = RewardScorer(self.judges["rm"].reward,
                             tokenizer_pair(self.cfg, tok, f"eval: the prepared data ({self.cfg.model.name_or_path})",
                                            self.reward_path, "the judge"))
        eos_id = Renderer(tok, self.cfg.data).eos_id
        correct = 0.0
        for i in range(0, len(rows), self.e.batch_size):
            pairs = pair_rollout([rows.row(j) for j in range(i, min(i + self.e.batch_size, len(rows)))],
                                 tok.pad_token_id, eos_id)
            scores = judge(pairs.to(self.device)).float()
            half = scores.shape[0] // 2
            correct += float((scores[:half] > scores[half:]).float().sum())
        return correct / len(rows)


def summarize(samples: dict, seed: int) -> dict:
    """A prompt set's figures from its per-prompt samples: lengths, EOS rates, and every judge's statistics
    with paired bootstrap intervals over its prompts; the episodes' figures where the models ran episodes."""
    stats = {"prompts": len(samples["kl"])}
    for label in ("final", "sft"):
        stats[f"{label}_length"] = float(np.mean(samples[f"{label}_length"]))
        stats[f"{label}_eos_rate"] = float(np.mean(samples[f"{label}_ended"]))
    stats.update(set_statistics(samples["final"], samples["sft"], samples["final_length"], samples["sft_length"],
                                samples["kl"], Bootstrap(seed=seed)))
    if "final_turns" in samples:
        stats.update(episode_statistics({side: {k: samples[f"{side}_{k}"] for k in EPISODE_COUNTS}
                                         for side in ("final", "sft")}, Bootstrap(seed=seed)))
    return stats


EPISODE_COUNTS = ("turns", "calls", "valid_calls")  # per episode, from its EpisodeRecord
# name → what it is, for the console and the report
EPISODE_FIGURES = {"tool_call_rate": "tool-call rate", "valid_call_rate": "valid-call rate",
                   "turns_per_episode": "turns per episode"}


def episode_figures(counts: dict[str, np.ndarray], idx: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each figure of EPISODE_FIGURES on the episodes (idx None), or on each resample of them (idx [R, n]):
    the share of episodes with a tool call, valid calls / calls (NaN where there is no call), mean turns."""
    pick = (lambda x: x) if idx is None else (lambda x: x[idx])
    calls, valid, turns = pick(counts["calls"]), pick(counts["valid_calls"]), pick(counts["turns"])
    total = calls.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(total > 0, valid.sum(axis=-1) / total, np.nan)
    return {"tool_call_rate": (calls > 0).mean(axis=-1), "valid_call_rate": rate, "turns_per_episode": turns.mean(axis=-1)}


def episode_statistics(counts: dict[str, dict[str, np.ndarray]], boot: Bootstrap) -> dict:
    """counts[side][key]: per-episode EPISODE_COUNTS of each model (final, sft), episode i of both on prompt i.
    Per figure: each model's value and the difference final − SFT, with percentile-bootstrap intervals over
    the same resampled prompts as the judges' (paired). The valid-call rate is a ratio of sums: None where a
    model made no call, and an interval only where at least MIN_IDENTIFIABLE_SHARE of the resamples hold a
    call (of both models, for the difference)."""
    idx = boot.indices(len(counts["final"]["turns"]))
    point = {side: episode_figures(c, None) for side, c in counts.items()}
    draws = {side: episode_figures(c, idx) for side, c in counts.items()} if idx is not None else None
    out = {}
    for fig in EPISODE_FIGURES:
        values = {side: float(point[side][fig]) for side in ("final", "sft")}
        values["diff"] = values["final"] - values["sft"]
        resampled = None if draws is None else {"final": draws["final"][fig], "sft": draws["sft"][fig],
                                               "diff": draws["final"][fig] - draws["sft"][fig]}
        for key, value in values.items():
            usable = None if resampled is None else resampled[key][~np.isnan(resampled[key])]
            ci = (boot.interval(usable) if usable is not None and len(usable) >= MIN_IDENTIFIABLE_SHARE * len(idx)
                  else None)
            name = f"{fig}_diff" if key == "diff" else f"{key}_{fig}"
            out[name], out[f"{name}_ci"] = (None, None) if np.isnan(value) else (value, ci)
    return out


def pooled_samples(per_set: dict[str, dict]) -> dict:
    """Every set's prompts as one sample: the pooled result is a paired bootstrap over all of them."""
    sets = list(per_set.values())
    out = {k: np.concatenate([s[k] for s in sets]) for k in sets[0] if k not in ("final", "sft")}
    for side in ("final", "sft"):
        out[side] = {j: np.concatenate([s[side][j] for s in sets]) for j in sets[0][side]}
    return out


POOLED = "pooled"


def result_rows(results: dict) -> dict[str, dict]:
    """The rows a table shows: every prompt set, then the pool of them all (when there is more than one)."""
    return {**results["sets"], **({POOLED: results[POOLED]} if results.get(POOLED) else {})}


def wilson_interval(share: float, n: int, z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval of a proportion measured on n items (the RM's accuracy on its eval pairs)."""
    if n < 1:
        return None
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [centre - half, centre + half]


def pair_rollout(rows: list[dict], pad_id: int, eos_id: int) -> Rollout:
    """Preference pairs (chosen rows then rejected rows) laid out as rollouts, so that a judge scores them as
    it scores responses; a response ends when its last token is the data's EOS (not cut by max_seq_len)."""
    batch = collate_pairs(rows, pad_id)
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ended = torch.tensor([int(s[-1]) == eos_id for s in seqs])
    return Rollout(batch["input_ids"], batch["lengths"], batch["prompt_lens"], batch["lengths"] - batch["prompt_lens"],
                   ended)


class PromptPlanner:
    """How many prompts of each set fit in eval's time budget: eval.max_prompts, or, once the first batch
    has been answered and judged, the same smaller count (a multiple of the batch size) for every set.
    Prompts are seeded by their index, so `eval.max_prompts=<plan>` replays the same evaluation."""

    def __init__(self, budget: StageBudget | None, n_sets: int, max_prompts: int, batch: int, plan_file: Path):
        self.budget, self.n_sets, self.batch, self.plan_file = budget, n_sets, batch, plan_file
        self.cap = self.configured = max_prompts

    def timed(self, prompts: int, seconds: float) -> None:
        if self.budget is None:
            return
        left = self.budget.seconds - (time.perf_counter() - self.budget.started)
        fit = prompts + int(max(left, 0.0) / (seconds / prompts))  # prompts over all sets, this batch's included
        self.cap = min(self.configured, max(self.batch, fit // self.n_sets // self.batch * self.batch))
        self.budget = None  # planned once, from the first batch
        print(f"eval: time budget → {self.cap} of {self.configured} prompts per set "
              f"({seconds / prompts:.1f}s per prompt)", flush=True)
        write_text_atomic(self.plan_file, json.dumps({"unit": "prompts per set", "configured": self.configured,
                                                      "planned": self.cap, "seconds_per_prompt": seconds / prompts}))


def run_eval(cfg: Config, show_progress: bool = True, budget: StageBudget | None = None) -> dict:
    """With a budget, the fixed work (perplexity, RM accuracy) comes first and the prompt sets share the
    rest (PromptPlanner)."""
    prepare(cfg, show_progress=show_progress)  # a cache hit after the training stages
    cmp = Comparison(cfg)
    out_dir = eval_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").unlink(missing_ok=True)
    renderer = Renderer(cmp.tokenizer, cfg.data)
    sets = prompt_sets(cfg, renderer)
    cmp.check_episode_prompts(sets)
    results: dict = {"policy": cmp.policy_path, "baseline": cmp.baseline_path, "reward_model": cmp.reward_path,
                     "second_judge": cfg.eval.second_judge, "judges": cmp.judge_names,
                     "text_rewards": cmp.text_reward_summary(), "episodes": cmp.episode_summary(),
                     "sampling": cfg.eval.sampling.model_dump(), "sets": {}}
    # The baseline's perplexity and the judge's accuracy on these very splits are what the SFT and RM stages
    # measured last (same model, same rows, same precision): read them instead of computing them again.
    same_sft_rows = cfg.sft.max_eval_batches is None and cfg.sft.loss_on == "response"
    results["sft_perplexity"] = stage_figure(cmp.baseline_path, sft_stage_dir(cfg), "eval/perplexity", same_sft_rows,
                                             lambda: cmp.perplexity(cmp.baseline))
    results["final_perplexity"] = cmp.perplexity(cmp.policy)
    results["rm_accuracy"] = (stage_figure(cmp.reward_path, rm_stage_dir(cfg), "eval/accuracy",
                                           cfg.rm.max_eval_batches is None, cmp.rm_accuracy) if cmp.reward_path else None)
    if results["rm_accuracy"] is not None:
        pairs = len(Blend([t for _, t in load_phase(cfg.output_dir / "data", 2, "eval")]))
        results["rm_accuracy_pairs"] = pairs
        results["rm_accuracy_ci"] = wilson_interval(results["rm_accuracy"], pairs)
    planner = PromptPlanner(budget, len(sets), cfg.eval.max_prompts, cfg.eval.batch_size, out_dir / "plan.json")
    tmp = out_dir / "generations.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as sink:
        for name, prompts in sets.items():
            if show_progress:
                print(f"eval: {name} ({min(len(prompts), planner.cap)} prompts)", flush=True)
            results["sets"][name] = cmp.compare_set(name, prompts, sink, planner)
    if len(cmp.samples) > 1:
        results[POOLED] = {"sets": list(cmp.samples), **summarize(pooled_samples(cmp.samples), cfg.eval.seed)}
    tmp.replace(out_dir / "generations.jsonl")
    write_text_atomic(out_dir / "eval.json", json.dumps(results, indent=1))
    return results


def stage_figure(model_path: str, stage_dir: Path, key: str, same_rows: bool, compute):
    """`key` from <stage>/final/eval.json when model_path is that stage's final model and the stage evaluated
    the same rows (its whole eval split, scored the same way), else compute()."""
    final = stage_dir / "final"
    summary = final / "eval.json"
    if same_rows and Path(model_path).resolve() == final.resolve() and summary.is_file():
        value = json.loads(summary.read_text()).get(key)
        if value is not None:
            return value
    return compute()


def judges_of(results: dict) -> list[str]:
    """The judges an eval.json reports (files written before "judges" was recorded: rm and judge2)."""
    return results.get("judges") or [j for j in ("rm", "judge2")
                                     if any(f"{j}_win_rate" in s for s in results["sets"].values())]


def judge_label(results: dict, judge: str) -> str:
    """A judge as the report names it: "accuracy", "format_rate (match rate)", "rm"."""
    metric = next((t["metric"] for t in results.get("text_rewards") or [] if t["name"] == judge), None)
    return judge if metric is None or metric == judge.replace("_", " ") else f"{judge} ({metric})"


def judge_note(results: dict) -> str:
    """What judged: the reward models and the text rewards, or, without a reward model, that it is absent."""
    text = results.get("text_rewards") or []
    rewards = ", ".join(f"{t['name']} = {t['metric']}" + (f" ({t['type']})" if t["type"] not in ("sum",) else "")
                        for t in text)
    environment = (results.get("episodes") or {}).get("environment")
    if "reward_model" in results and results["reward_model"] is None:
        judged = ("eval.rewards" if not environment else
                  f"the environment's reward ({ENVIRONMENT} = {environment}'s reward per episode)"
                  + (" and eval.rewards" if text else ""))
        return (f"judged by {judged} alone{': ' + rewards if text else ''}. No reward model was given or trained "
                "(eval.reward_model, ppo.reward_model, the RM stage), so there are no rm scores and no rm_accuracy.")
    return f"text rewards: {rewards}" if text else ""


def format_table(results: dict) -> str:
    judges = judges_of(results)
    head = f"{'set':<22} {'n':>4} " + " ".join(f"{j + ' sft':>9} {j + ' final':>9} {'win':>6}" for j in judges)
    head += f" {'KL':>7} {'len sft':>8} {'len fin':>8} {'eos sft':>8} {'eos fin':>8}"
    lines = [head]
    for name, s in result_rows(results).items():
        row = f"{name:<22} {s['prompts']:>4} "
        row += " ".join(f"{s[f'{j}_sft_score']:>9.3f} {s[f'{j}_final_score']:>9.3f} {s[f'{j}_win_rate']:>6.3f}"
                        for j in judges)
        row += (f" {s['kl_to_sft']:>7.3f} {s['sft_length']:>8.1f} {s['final_length']:>8.1f}"
                f" {s['sft_eos_rate']:>8.2f} {s['final_eos_rate']:>8.2f}")
        lines.append(row)
    extra = []
    for key in ("sft_perplexity", "final_perplexity", "rm_accuracy"):
        if results.get(key) is not None:
            extra.append(f"{key} {results[key]:.4g}")
    if results.get("rm_accuracy_ci"):
        extra[-1] += f" {fmt_interval(results['rm_accuracy_ci'], '.3f')} on {results['rm_accuracy_pairs']} pairs"
    note = judge_note(results)
    episodes = [episode_note(results["episodes"])] if results.get("episodes") else []
    return "\n".join(lines + ["  ".join(extra)] + ([note] if note else []) + episodes + interval_lines(results, judges))


def episode_note(episodes: dict) -> str:
    """What both models ran: "episodes: tools calculator, up to 3 turns and 448 tokens each (ppo's episode
    settings); …"."""
    parts = ([f"tools {', '.join(episodes['tools'])}"] if episodes["tools"] else []) + (
        [f"environment {episodes['environment']}"] if episodes["environment"] else [])
    return (f"episodes: {', '.join(parts)}, up to {episodes['max_turns']} turns and {episodes['max_episode_tokens']} "
            "tokens each (ppo's episode settings); lengths and KL count the model's own tokens")


def episode_figure_text(s: dict, fig: str) -> str:
    """"tool-call rate final 0.50 [0.25, 0.75] vs SFT 0.12 [0.00, 0.31], diff +0.375 [+0.125, +0.625]"."""
    return (f"{EPISODE_FIGURES[fig]} final {fmt(s[f'final_{fig}'], '.2f')} {fmt_interval(s[f'final_{fig}_ci'], '.2f')} "
            f"vs SFT {fmt(s[f'sft_{fig}'], '.2f')} {fmt_interval(s[f'sft_{fig}_ci'], '.2f')}, "
            f"diff {fmt(s[f'{fig}_diff'])} {fmt_interval(s[f'{fig}_diff_ci'])}")


def interval_lines(results: dict, judges: list[str]) -> list[str]:
    """Per set and judge: mean scores, gain, win rate and gain at equal length with their intervals; per set:
    KL and length difference with theirs, then the flags."""
    lines = []
    for name, s in result_rows(results).items():
        level = f"{s['bootstrap']['confidence']:.0%} CI"
        for j in judges:
            lines.append(f"{name} {judge_label(results, j)}: final {fmt(s[f'{j}_final_score'], '.3f')} "
                         f"{fmt_interval(s[f'{j}_final_score_ci'], '.3f')} vs SFT {fmt(s[f'{j}_sft_score'], '.3f')} "
                         f"{fmt_interval(s[f'{j}_sft_score_ci'], '.3f')}; gain {fmt(s[f'{j}_gain'])} "
                         f"{fmt_interval(s[f'{j}_gain_ci'])} {level}, win {fmt(s[f'{j}_win_rate'], '.2f')} "
                         f"{fmt_interval(s[f'{j}_win_rate_ci'], '.2f')}, at equal length "
                         f"{fmt(s[f'{j}_gain_at_equal_length'])} {fmt_interval(s[f'{j}_gain_at_equal_length_ci'])}")
        lines.append(f"{name}: KL to SFT {fmt(s['kl_to_sft'], '.3f')} {fmt_interval(s['kl_to_sft_ci'], '.3f')} nats, "
                     f"length final − SFT {fmt(s['length_diff'], '+.1f')} {fmt_interval(s['length_diff_ci'], '+.1f')} tokens")
        if "final_turns_per_episode" in s:
            lines.append(f"{name} episodes: " + "; ".join(episode_figure_text(s, fig) for fig in EPISODE_FIGURES))
        lines += [f"{name} flag {f['flag']}: {f['reason']}" for f in s["flags"]]
    return lines

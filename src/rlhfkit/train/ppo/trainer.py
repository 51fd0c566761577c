"""Stage 3, RL (`rlhfkit ppo CONFIG`): rollouts on phase-3 prompts, experience, clipped policy updates of
the actor (and, for PPO's gae, the critic), periodic eval on held-out prompts, checkpoints with exact resume.

One step = sample n_samples_per_prompt responses per prompt with the rollout copy → reward them
(reward_sum.py: the reward model and/or text sources) → advantages by ppo.advantage (experience.py) →
ppo_epochs passes over the batch in mini-batches, one actor (and critic) optimizer step per mini-batch →
refresh the rollout copy, update the KL controller and the EMA. The critic exists only for gae.

With ppo.normalize_scores the reward's mean/std come from the initial policy's own samples of PPO prompts,
measured once at a fresh start and kept with every checkpoint; the critic starts in that scale.

With ppo.tools or ppo.environment a rollout is a multi-turn episode (rollout/episodes.py): the same step,
with loss, KL and advantages on the model's own tokens (the rollout's action mask), the environment's reward
one more source, and the episodes' turns, tool calls and errors logged.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ...agents.environments import EpisodeError
from ...config import Config, ppo_world_problems
from ...engine import distributed as D
from ...engine.backend import TrainEngine, begin_checkpoint, finish_checkpoint, latest_checkpoint, seed_everything
from ...engine.precision import torch_dtype
from ...engine.weights import gathered_weights
from ...errors import ConfigError, RlhfkitError
from ...models.configs import base_config, model_config_for
from ...models.loading import load_tokenizer
from ...models.reward import RewardModel
from ...tracking import Tracker
from ..batching import StepSchedule, collate_sft, count_sft_targets
from ..common import begin_stage, save_causal_lm, stage_data, write_causal_lm
from ..budget import StageBudget, StepPlanner
from ...models.finite import require_finite_weights
from ..guards import NonFiniteGuard
from ..loop import finish_timing, publish_final, timed, truncate_metrics
from ..update_probe import UpdateProbe
from ...timing import clock, linear_params
from . import formulas as PF
from .ema import ActorEMA
from ...rollout.sampling import (RolloutPolicy, check_ppo_sampling, concat_rollouts, sample_rollouts, sampling_for,
                                 select_rows)
from ...rollout.episodes import EpisodeRunner, episode_metrics, episode_runner, episode_sum_keys, episode_sums
from ...rollout.scoring import FrozenModel, RewardScorer, actor_logprobs, critic_values, response_kl
from .experience import (LOGP_REUSE_CHECK_EVERY, LOGP_REUSE_MAX_ABS_DIFF, Experience, explained_variance_over_ranks,
                         make_experience, masked_moments_over_ranks)
from .models import actor_start, build_actor, build_critic, build_reference, build_reward, check_tokenizers
from .reward_sum import MODEL, RewardFailed, RewardSum

SCORE_STATS_FILE = "score_stats.json"  # in every checkpoint: a resumed run normalises exactly as before


def ppo_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "ppo"


class PPOTrainer:
    def __init__(self, cfg: Config, show_progress: bool = True, reward_model: torch.nn.Module | None = None,
                 budget: StageBudget | None = None):
        self.out_dir, self.show_progress, self.budget = ppo_stage_dir(cfg), show_progress, budget
        cfg = self.cfg = begin_stage(cfg, self.out_dir, "ppo")
        p = self.p = cfg.ppo
        check_ppo_sampling(p.sampling)
        seed_everything(p.seed)
        self.rank, self.world = D.init_distributed()
        self.device = D.device()
        self.prompts, self.eval_prompts, self.pad_id = stage_data(cfg, 3, show_progress)
        self.ptx = stage_data(cfg, 1, show_progress)[0] if p.ptx_coef > 0 else None

        problems = ppo_world_problems(p, self.world)
        if problems:
            raise ConfigError("; ".join(problems))
        self.n_mini = p.responses_per_step // self.mini_batch
        self.schedule = StepSchedule(len(self.prompts), p.rollout_batch_size, p.seed, 1, p.steps)
        updates = p.steps * p.ppo_epochs * self.n_mini
        self.actor_t = _with_accumulation(p.actor, self.mini_batch // self.world)
        self.critic_t = _with_accumulation(p.critic, self.mini_batch // self.world) if p.uses_critic else None

        self.tokenizer = load_tokenizer(model_config_for(cfg, actor_start(cfg)))
        self.sampling, self.stop_ids = sampling_for(p.sampling, self.tokenizer)
        self.episodes = self._build_episodes() if p.episodes else None
        self.resume_from = latest_checkpoint(self.out_dir) if p.resume != "never" else None
        # Models: trainable actor and critic through the backend, frozen reference and reward. The critic
        # comes last: with normalised scores its head is set from the statistics the others measure.
        actor_model, groups = build_actor(cfg, self.actor_t)
        self.actor = TrainEngine(actor_model, self.actor_t, updates, groups)
        self.probe = UpdateProbe("ppo.actor", self.actor.module, self.actor.cfg.dtype)
        self.last_step_flops = 0.0
        self.reference = build_reference(cfg)
        self.rewards = self._build_rewards(reward_model)
        self.kl_ctl = (PF.AdaptiveKLController(p.kl_coef, p.adaptive_kl.target, p.adaptive_kl.horizon)
                       if p.adaptive_kl else PF.FixedKLController(p.kl_coef))
        self.policy = RolloutPolicy(self.actor, self.actor_t, torch_dtype(p.rollout_dtype), p.rollout_decoding)
        self.reuse_logprobs = p.reuse_rollout_logprobs and self.policy.exact
        self.norm = self.score_normalization() if p.normalize_scores else None
        self.rewards.score_stats = self.score_stats = (self.norm["mean"], self.norm["std"]) if self.norm else None
        self.critic = None
        if p.uses_critic:  # the critic starts as the RM that gives the scores, in the scale of the summed reward
            if reward_model is None:
                text_mean = (self.norm or {}).get("text_mean", 0.0)
                critic_model, groups = build_critic(cfg, self.critic_t, self.score_stats, self.rewards.model_weight,
                                                    text_mean)
            else:  # a reward module given in code: the critic keeps the reward model's head
                critic_model, groups = build_critic(cfg, self.critic_t)
            self.critic = TrainEngine(critic_model, self.critic_t, updates, groups)
        self.ema = ActorEMA(p.ema_decay, self.actor, p.actor) if p.ema_decay else None

    @property
    def mini_batch(self) -> int:
        return self.p.responses_per_update

    def _build_rewards(self, reward_model: torch.nn.Module | None) -> RewardSum:
        """The reward model when a `model` source is configured (or a module given in code: tests, custom
        rewards), and the text sources (rlhfkit.rewards)."""
        sources = self.p.reward.sources
        model_source = next((s for s in sources if s.type == MODEL), None)
        scorer = None
        if reward_model is not None:
            scorer = RewardScorer(FrozenModel(reward_model, self.p.reward))
        elif model_source is not None:
            scorer = RewardScorer(build_reward(self.cfg), check_tokenizers(self.cfg))
        weight = model_source.weight if model_source is not None else 1.0
        text_sources = []
        if any(s.type != MODEL for s in sources):
            from ...rewards.sources import build_text_sources

            text_sources = build_text_sources(sources)
        return RewardSum(scorer, weight, text_sources, self.tokenizer,
                         self.p.environment_weight if self.p.environment else None)

    def _build_episodes(self) -> EpisodeRunner:
        """The tools and environment loaded, and every phase-3 prompt checked to take the tools' description
        (config errors naming the setting or the prompt)."""
        p, cfg = self.p, self.cfg
        runner = episode_runner(p, self.tokenizer, cfg.data.template, cfg.data.system_prompt, self.stop_ids,
                                p.episode_tokens)
        tables = (("training", self.prompts), ("eval", self.eval_prompts)) if p.tools else ()
        for split, table in tables:
            for i in range(len(table)):
                try:
                    runner.prompt_ids(table.row(i)["prompt_ids"])
                except ValueError as e:
                    raise ConfigError(f"ppo.tools: phase-3 {split} prompt {i}: {e}") from None
        return runner

    # --- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        p = self.p
        start = self._resume()
        if D.is_main():
            truncate_metrics(self.out_dir / "metrics.jsonl", start if start else -1)
        planner = StepPlanner(self.budget, "ppo", p.steps, p.eval_every, p.save_every, self.out_dir / "plan.json",
                              resumed=start > 0)
        total = planner.total
        tracker = Tracker(self.out_dir, total, start, desc="ppo", enabled=D.is_main(),
                          show_progress=self.show_progress, config=self.cfg.model_dump(mode="json"))
        stage_clock = clock()
        stage_clock.add("load", time.perf_counter() - stage_clock.started)  # models, resume state, normalisation
        stage_clock.dtype = self.actor.cfg.dtype
        probe = self.probe
        if start:
            tracker.write(f"ppo: resumed at step {start}/{total}")
        else:
            norm = {f"score_norm/{k}": v for k, v in (self.norm or {}).items()}
            with stage_clock.part("eval"):
                tracker.log(0, {**norm, **self._evaluate_or_save(0, planner)})
        guard = NonFiniteGuard("ppo", self.out_dir, p.actor.max_nonfinite_steps, "ppo.actor.max_nonfinite_steps")
        done = start
        while done < total:
            try:
                metrics = self.step(done)
            except RewardFailed as e:
                raise RewardFailed(f"ppo: step {done + 1}: {e}; {self._save_for_resume(done)}") from None
            done += 1
            stage_clock.add("train_steps", metrics["time/step"])
            stage_clock.train_flops += self.last_step_flops
            metrics.update(probe.after(done, tracker.write))
            total = planner.after_step(done, metrics["time/step"])
            tracker.set_total(total)
            tracker.log(done, metrics, advance=True)
            guard.check(done, {k: metrics.get(k) for k in ("loss/policy", "loss/value", "policy/grad_norm",
                                                           "val/grad_norm")})
            if p.eval_every and done % p.eval_every == 0 and done < total:
                with stage_clock.part("eval"):
                    tracker.log(done, self._evaluate_or_save(done, planner))
            if p.save_every and done % p.save_every == 0 and done < total:
                timed(self.save_checkpoint, planner.timed_save, "checkpoint")(done)
        with stage_clock.part("eval"):
            final = self._evaluate_or_save(total, planner, timed_eval=False)
        tracker.log(total, final)
        with stage_clock.part("checkpoint"):
            ckpt = timed(self.save_checkpoint, planner.timed_final_save)(total)
            planner.write()
            if D.is_main():
                publish_final(ckpt / "model", self.out_dir / "final", final)
                if self.ema is not None:
                    publish_final(ckpt / "ema_model", self.out_dir / "final-ema", {})
            D.copy_dir_to_every_disk(self.out_dir / "final")  # eval and export may run on any node
            if self.ema is not None:
                D.copy_dir_to_every_disk(self.out_dir / "final-ema")
        D.barrier()
        tracker.close()
        finish_timing(self.out_dir, probe)
        return final

    def step_flops(self, rollout, recomputed_logprobs: bool) -> float:
        """Model FLOPs of one step on this process (timing.py's rule, N from the actor's linear layers; the
        frozen and value models are taken to be the actor's size): decoding at 2·N per generated token, the
        experience forwards (the reference and the reward model where they run, the actor's old log-probs where
        recomputed, the critic) at
        2·N per token, and ppo_epochs passes of actor (and critic) training."""
        n, trainable, backward = linear_params(self.actor.module)
        tokens = float(rollout.lengths.sum())
        forwards = (int(self.p.kl_mode != "off") + int(self.rewards.model_scorer is not None)  # reference, RM
                    + int(recomputed_logprobs) + int(self.critic is not None))
        trained = (2 * n + 2 * backward + 2 * trainable) * (1 + int(self.critic is not None))
        sampled = float(rollout.response_mask().sum())  # decoded token by token (not what tools added)
        return 2 * n * sampled + tokens * (2 * n * forwards + self.p.ppo_epochs * trained)

    def step(self, step: int) -> dict:
        p = self.p
        t0 = time.perf_counter()
        rollout, metadata, episodes = self.step_samples(step)
        t1 = time.perf_counter()
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        kl_coef = self.kl_ctl.value  # this batch's rewards use it; the controller moves it after the step
        per_source = self.reward_parts(rollout, metadata, episodes)
        # checked on steps 0, 10, 20...: by the step, not by the process, so a resumed run computes what the
        # uninterrupted one did (the checkpoint keeps whether a gap already turned reuse off)
        check = self.reuse_logprobs and step % LOGP_REUSE_CHECK_EVERY == 0
        exp = make_experience(rollout, self.rewards.total(per_source), self.actor, self.reference, self.critic, p,
                              kl_coef, self.actor_t.micro_batch_size, self.device, self.reuse_logprobs, check)
        self._stop_reuse_if_inexact(exp)
        self.last_step_flops = self.step_flops(rollout, not self.reuse_logprobs or check)
        t2 = time.perf_counter()
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        self.probe.before()
        train_stats = self.update(exp, step, kl_coef)
        t_refresh = time.perf_counter()
        self.policy.refresh(self.actor)
        t_refresh = time.perf_counter() - t_refresh
        if self.ema is not None:
            self.ema.update(self.actor)
        t3 = time.perf_counter()

        stats = self.experience_stats(exp, kl_coef, per_source)
        if self.episodes is not None:
            stats.update(self.episode_stats(episodes))
        if exp.logp_gap is not None:
            stats["rollout/logp_reuse_max_abs_diff"], stats["rollout/logp_reuse_mean_abs_diff"] = exp.logp_gap
        if p.kl_mode != "off":
            self.kl_ctl.update(stats["objective/kl"], p.responses_per_step)
        generated = D.all_reduce_sum([float(rollout.response_mask().sum())])[0]  # sampled, not added by tools
        stats.update(train_stats)
        if self.critic is not None:
            stats["lr/critic"] = self.critic.lr
        stats.update({"objective/kl_coef": kl_coef, "lr/actor": self.actor.lr,
                      "time/generation": t1 - t0, "time/experience": t2 - t1, "time/training": t3 - t2,
                      "time/step": t3 - t0, "time/rollout_refresh": t_refresh, "tokens/generated": generated,
                      "tokens/generation_per_s": generated / max(t1 - t0, 1e-9),
                      "tokens/per_s": generated / max(t3 - t0, 1e-9)})
        return stats

    def _stop_reuse_if_inexact(self, exp: Experience) -> None:
        """A gap above LOGP_REUSE_MAX_ABS_DIFF (make_experience used the actor's log-probs for this batch) turns
        reuse off for the rest of this process: the numeric paths differ, not just this batch."""
        if self.reuse_logprobs and exp.logp_gap is not None and exp.logp_gap[0] > LOGP_REUSE_MAX_ABS_DIFF:
            self.reuse_logprobs = False
            if D.is_main():
                print(f"ppo: the sampler's log-probs differ from the actor's by up to {exp.logp_gap[0]:.3g} per token "
                      f"(> {LOGP_REUSE_MAX_ABS_DIFF:g}): recomputing the old log-probs from now on", flush=True)

    def step_rollouts(self, step: int):
        """step_samples without the episodes' records: the rollout and the metadata per row."""
        return self.step_samples(step)[:2]

    def step_samples(self, step: int):
        """This process's share of step `step`'s prompts (by their place in the global batch), each sampled
        n_samples_per_prompt times (consecutive rows: a group), the prompt records' metadata per row, and the
        episodes' records (rollout/episodes.py; [] without episodes). Response k of the prompt at place j
        has sampling seed (step, j·n + k)."""
        n = self.p.n_samples_per_prompt
        rows = self.schedule.rows_for_step(step)
        mine = np.array_split(np.arange(len(rows)), self.world)[self.rank]
        records = [self.prompts.row(int(rows[j])) for j in mine]
        metadata = [rec.get("metadata", {}) for rec in records for _ in range(n)]
        rollout, episodes = self.rollouts([rec["prompt_ids"] for rec in records for _ in range(n)],
                                          [_seed(self.p.seed, step, int(j) * n + k) for j in mine for k in range(n)],
                                          metadata, [f"prompt {int(rows[j])}, sample {k}" for j in mine for k in range(n)])
        return rollout, metadata, episodes

    def rollouts(self, prompts: list[np.ndarray], seeds: list[int], metadata: list[dict], names: list[str]):
        """Sample one response (or episode) per prompt with the rollout copy, in generation batches. Each
        prompt has its own sampling seed (its step and place in the global batch), so the samples are the same
        however the batch is split over processes or generation batches. Returns the rollout and the episodes'
        records ([] without episodes). An episode that fails on any process (EpisodeError: an environment's
        failure, or messages the chat template refuses) stops every process with RewardFailed, as a failed reward
        source does."""
        size = self.p.generation_batch_size or max(len(prompts), 1)
        keep = self.reuse_logprobs or self.p.tis_cap is not None  # the sampler's log-probs: reused, or TIS
        if self.episodes is None:
            return concat_rollouts(sample_rollouts(self.policy.model, prompts, seeds, size, self.pad_id, self.stop_ids,
                                                   self.sampling, keep, self.policy.decoder), self.pad_id), []
        problem = None
        try:
            out = self.episodes.run(self.policy.model, prompts, metadata, names, seeds, size, self.pad_id,
                                    self.stop_ids, self.sampling, keep, self.policy.decoder)
        except EpisodeError as e:
            problem = str(e)
        # every process learns of a failure anywhere: the others would wait in a collective
        failed = D.all_reduce_sum([float(problem is not None)])[0]
        if failed:
            raise RewardFailed(problem or f"an episode failed on {int(failed)} other process(es)")
        return out

    def reward_parts(self, rollout, metadata: list[dict], episodes: list) -> dict[str, torch.Tensor]:
        """{source name: [B] raw reward}: the reward sources', and the environment's per-episode reward."""
        environment = torch.tensor([e.environment_reward for e in episodes]) if self.p.environment else None
        return self.rewards.per_source(rollout, metadata, self.actor_t.micro_batch_size, self.device, environment)

    def episode_stats(self, episodes: list, prefix: str = "") -> dict:
        """The episodes' turns, tokens, tool calls and error observations, over every process."""
        keys = episode_sum_keys()
        sums = episode_sums(episodes)
        return episode_metrics(dict(zip(keys, D.all_reduce_sum([sums[k] for k in keys]))), prefix)

    def update(self, exp: Experience, step: int, kl_coef: float) -> dict:
        """ppo_epochs passes over the batch; per mini-batch one actor (and critic) optimizer step.

        Each micro-batch's loss is normalised by the mini-batch's counts over all processes (tokens, or
        responses for the per-sequence aggregations: the backend's scaling contract), so the step's
        gradient is that of the aggregate over the whole mini-batch. Rows dropped by dynamic sampling do
        not count; a step in which every group was dropped makes no update. Gradient norms are logged as
        the mean and the max over the step's optimizer steps."""
        p = self.p
        n_local = len(exp.rollout.lengths)
        if D.all_reduce_sum([float(exp.keep.sum())])[0] == 0:
            return {"policy/skipped_updates": float(p.ppo_epochs * self.n_mini)}
        kept_lengths = torch.where(exp.keep, exp.rollout.response_mask().sum(1), 0)  # the model's tokens
        sums: Counter = Counter()
        grad_norms: dict[str, list] = {"policy": [], "val": []}  # one per optimizer step (mini-batch)
        for epoch in range(p.ppo_epochs):
            order = np.random.default_rng([p.seed, step, epoch]).permutation(n_local)
            for k, mini in enumerate(np.array_split(order, self.n_mini)):
                update_index = (step * p.ppo_epochs + epoch) * self.n_mini + k
                counts = D.all_reduce_sum([float(kept_lengths[mini].sum()), float(exp.keep[mini].sum())])
                ptx_batches, ptx_tokens = self.ptx_batches(update_index)
                for micro, ptx_rows in zip(np.array_split(mini, self.actor_t.gradient_accumulation_steps), ptx_batches):
                    sums.update(self.actor_micro_step(exp, torch.as_tensor(micro), counts, kl_coef, ptx_rows,
                                                      ptx_tokens))
                grad_norms["policy"].append(self.actor.grad_norm())
                if self.critic is not None:
                    for micro in np.array_split(mini, self.critic_t.gradient_accumulation_steps):
                        sums.update(self.critic_micro_step(exp, torch.as_tensor(micro), counts[0]))
                    grad_norms["val"].append(self.critic.grad_norm())
        keys = sorted(sums)
        totals = dict(zip(keys, D.all_reduce_sum([float(sums[k]) for k in keys])))
        n_tok = max(totals.pop("tokens"), 1)
        ptx_loss, ptx_tokens = totals.pop("ptx/loss", None), totals.pop("ptx/tokens", 0)
        out = {k: v / n_tok for k, v in totals.items()}
        if ptx_loss is not None:
            out["ptx/loss"] = ptx_loss / max(ptx_tokens, 1)
        for name, norms in grad_norms.items():
            if name == "val" and self.critic is None:
                continue
            seen = [n for n in norms if n is not None]
            out[f"{name}/grad_norm"] = float(np.mean(seen)) if seen else None
            out[f"{name}/grad_norm_max"] = float(np.max(seen)) if seen else None
        return out

    def actor_micro_step(self, exp: Experience, idx: torch.Tensor, counts: list[float], kl_coef: float,
                         ptx_rows, ptx_tokens) -> dict:
        """The clipped surrogate (clip_low/clip_high), plus β·KL when the KL is a loss term, aggregated by
        ppo.loss_aggregation with the mini-batch's token and response counts over all processes."""
        p = self.p
        sub = select_rows(exp.rollout, idx).to(self.device)
        width = sub.width
        mask = sub.response_mask() & exp.keep[idx].to(self.device)[:, None]
        logprobs = actor_logprobs(self.actor, sub, p.sampling.temperature)
        old, adv = exp.old_logprobs[idx, :width].to(self.device), exp.advantages[idx, :width].to(self.device)
        clip_low = p.clip_low or p.cliprange
        per_token, st = PF.clipped_surrogate(logprobs, old, adv, mask, clip_low, p.clip_high or p.cliprange)
        out = {"tokens": float(mask.sum())}
        if p.tis_cap is not None:  # the policy-gradient term only, not the KL loss
            weights = PF.truncated_is_weights(old, sub.logprobs, mask, p.tis_cap)
            per_token = per_token * weights
            out.update({"policy/tis_weight_mean": float(weights.sum()),
                        "policy/tis_capped_frac": float((mask & (weights >= p.tis_cap)).sum())})
        out["loss/policy"] = float(per_token.detach().sum())
        out.update({f"policy/{k}": float(v.sum()) for k, v in
                    (("clipfrac", st["clipped"]), ("approxkl", st["approxkl"]), ("ratio_mean", st["ratio"]))})
        if p.kl_mode == "loss":
            kl = PF.kl_loss_term(logprobs, exp.ref_logprobs[idx, :width].to(self.device), mask, p.kl_estimator_used)
            per_token = per_token + kl_coef * kl
            out["loss/kl"] = float(kl.detach().sum())
        tokens, sequences = max(counts[0], 1.0), max(counts[1], 1.0)
        total = PF.aggregate_loss(per_token, mask, p.loss_aggregation, tokens, sequences, p.episode_tokens)
        if ptx_rows is not None:
            batch = collate_sft(ptx_rows, self.pad_id)
            lp, _ = self.actor(batch["input_ids"].to(self.device), batch["lengths"].to(self.device),
                               batch["loss_mask"].to(self.device))
            total = total - p.ptx_coef * lp.sum() / ptx_tokens
            out.update({"ptx/loss": -lp.sum().item(), "ptx/tokens": float(lp.numel())})
        self.actor.backward(total)
        return out

    def critic_micro_step(self, exp: Experience, idx: torch.Tensor, tokens: float) -> dict:
        sub = select_rows(exp.rollout, idx).to(self.device)
        width = sub.width
        mask = sub.response_mask() & exp.keep[idx].to(self.device)[:, None]
        values = critic_values(self.critic, sub)
        old, ret = exp.old_values[idx, :width].to(self.device), exp.returns[idx, :width].to(self.device)
        loss, stats = PF.value_loss(values, old, ret, mask, self.p.cliprange_value)
        n = float(mask.sum())
        self.critic.backward(loss * n / max(tokens, 1.0))
        return {"loss/value": loss.item() * n, **{k: v * n for k, v in stats.items()}}

    def ptx_batches(self, update_index: int):
        """This process's phase-1 rows for one mini-batch's ptx loss (one micro-batch per actor micro-batch),
        and the target-token count over all processes that normalises it."""
        gas = self.actor_t.gradient_accumulation_steps
        if self.ptx is None:
            return [None] * gas, 0
        schedule = StepSchedule(len(self.ptx), self.mini_batch, self.p.seed + 1)
        rows = schedule.rows_for_step(update_index)
        tokens = count_sft_targets([self.ptx.row(int(i)) for i in rows])
        mine = np.array_split(rows, self.world)[self.rank]
        return [[self.ptx.row(int(i)) for i in part] for part in np.array_split(mine, gas)], max(tokens, 1)

    def experience_stats(self, exp: Experience, kl_coef: float, per_source: dict[str, torch.Tensor]) -> dict:
        """Rollout metrics over all processes, per sequence unless named per token (TRL's names); kl_coef is
        the β of this batch's KL (in the reward or the loss); reward/<name> is each source's raw mean."""
        mask = exp.rollout.response_mask()
        kl_seq = exp.kl.sum(1)
        in_reward = self.p.kl_mode == "reward"  # only then is −β·KL part of the reward (non_score_reward)
        sums = {
            "objective/kl": kl_seq.sum(),
            "objective/entropy": -(exp.old_logprobs * mask).sum(),  # TRL: per-sequence −Σ log π
            **({"objective/non_score_reward": (-kl_coef * kl_seq).sum()} if in_reward else {}),
            "objective/scores": self.rewards.total(per_source, normalize=False).sum(),  # before normalisation
            "objective/scores_shaped": exp.shaped_scores.sum(),
            "rollout/response_length": exp.rollout.response_lengths.sum(),
            "rollout/eos_rate": exp.rollout.ended.float().sum(),
            **{f"reward/{name}": values.sum() for name, values in per_source.items()},
        }
        keys = sorted(sums)
        n, *vals = D.all_reduce_sum([float(len(kl_seq))] + [float(sums[k]) for k in keys])
        out = {k: v / n for k, v in zip(keys, vals)}
        out["objective/rlhf_reward"] = out["objective/scores_shaped"] + out.get("objective/non_score_reward", 0.0)
        if self.p.dynamic_sampling:  # a count over the whole step, not a mean
            out["rollout/groups_dropped"] = D.all_reduce_sum([float((~exp.keep).sum()) / self.p.n_samples_per_prompt])[0]
        if self.p.kl_mode == "off":
            del out["objective/kl"]
        if self.critic is not None:
            out["val/explained_variance"] = explained_variance_over_ranks(exp.old_values, exp.returns, mask)
            out["val/mean"] = masked_moments_over_ranks(exp.old_values, mask)[0]
            out["val/returns_mean"] = masked_moments_over_ranks(exp.returns, mask)[0]
        return out

    # --- eval ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Held-out phase-3 prompts (the same ones and the same sampling seed every time): mean RM score,
        KL to the reference (Σ over response tokens of log π − log π_ref), response length, EOS rate."""
        p = self.p
        # the same number per process: ZeRO-3 models gather layers collectively, forward for forward
        n = min(p.eval_prompts, len(self.eval_prompts)) // self.world * self.world
        if n == 0:
            return {}
        idx = np.array_split(np.arange(n), self.world)[self.rank]
        self.actor.eval()
        records = [self.eval_prompts.row(int(i)) for i in idx]
        metadata = [rec.get("metadata", {}) for rec in records]
        rollout, episodes = self.rollouts([rec["prompt_ids"] for rec in records], [_seed(p.seed, -1, int(i)) for i in idx],
                                          metadata, [f"eval prompt {int(i)}" for i in idx])
        per_source = self.reward_parts(rollout, metadata, episodes)
        scores = self.rewards.total(per_source, normalize=False)
        kls = []
        for start in range(0, len(idx), self.actor_t.micro_batch_size):
            sub = select_rows(rollout, torch.arange(start, min(start + self.actor_t.micro_batch_size, len(idx))))
            kls.append(_model_token_kl(self.actor, self.reference, sub.to(self.device), p.sampling.temperature).cpu())
        self.actor.train()
        kls = torch.cat(kls)
        names = sorted(per_source)
        count, s, kl, length, eos, *by_source = D.all_reduce_sum(
            [float(len(idx)), float(scores.sum()), float(kls.sum()), float(rollout.response_lengths.sum()),
             float(rollout.ended.sum())] + [float(per_source[k].sum()) for k in names])
        if D.is_main() and p.samples_logged:
            self._write_samples(step, rollout, scores, per_source)
        out = {"eval/score": s / count, "eval/kl": kl / count, "eval/response_length": length / count,
               "eval/eos_rate": eos / count}
        if names != [MODEL]:
            out.update({f"eval/reward/{k}": v / count for k, v in zip(names, by_source)})
        if self.episodes is not None:
            out.update(self.episode_stats(episodes, "eval/"))
        return out

    def _write_samples(self, step: int, rollout, scores, per_source: dict[str, torch.Tensor]) -> None:
        prompts, responses = self.rewards.texts(rollout)
        with open(self.out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for i in range(min(self.p.samples_logged, len(scores))):
                rewards = {k: float(v[i]) for k, v in per_source.items()}
                f.write(json.dumps({"step": step, "prompt": prompts[i], "response": responses[i],
                                    "score": float(scores[i]), **({"rewards": rewards} if len(rewards) > 1 else {})})
                        + "\n")

    # --- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        tmp = begin_checkpoint(self.out_dir, step)
        # reuse_logprobs: once a gap turned reuse off, a resumed run keeps it off, as the uninterrupted run would
        self.actor.save_state(tmp / "actor", {"step": step, "kl_controller": self.kl_ctl.state_dict(),
                                              "reuse_logprobs": self.reuse_logprobs})
        save_causal_lm(self.actor, self.tokenizer, tmp / "model", self.p.actor)
        if self.critic is not None:
            self.critic.save_state(tmp / "critic", {"step": step})
            self._save_critic(tmp / "critic_model")
        if self.ema is not None:
            self.ema.save(tmp / "ema.safetensors")
            if D.is_main():
                require_finite_weights(self.ema.weights, str(tmp / "ema_model"))
                write_causal_lm(self.ema.weights, base_config(self.actor.module.lm), self.tokenizer, tmp / "ema_model")
        if self.norm is not None and D.is_main():
            kept = {k: self.norm[k] for k in ("mean", "std", "samples")}  # all a resumed run normalises by
            (tmp / SCORE_STATS_FILE).write_text(json.dumps(kept, indent=1))
        return finish_checkpoint(tmp, step, self.p.keep_checkpoints, {"step": step, "stage": "ppo"})

    def _evaluate_or_save(self, done: int, planner: StepPlanner, timed_eval: bool = True) -> dict:
        """evaluate(done); a reward that fails there is handled as in a step: the steps done are checkpointed
        (unless they already are), so that rerunning resumes after them instead of losing them."""
        try:
            return timed(self.evaluate, planner.timed_eval)(done) if timed_eval else self.evaluate(done)
        except RewardFailed as e:
            raise RewardFailed(f"ppo: eval after step {done}: {e}; {self._save_for_resume(done)}") from None

    def _save_for_resume(self, done: int) -> str:
        """After a failed reward call: the state after step `done` (nothing of the failed step was applied),
        checkpointed unless it already is, so the same command resumes there."""
        if done == 0:
            return "no step had finished, so rerunning starts over"
        if not (self.out_dir / "checkpoints" / f"step-{done:07d}" / "COMPLETE").is_file():
            self.save_checkpoint(done)
        return f"the run is checkpointed at step {done}: rerun the same command to resume once the failure is fixed"

    def _save_critic(self, out: Path) -> None:
        sd = gathered_weights(self.critic, self.critic_t, prefix="rm.", merge=True)
        if D.is_main():
            rm = self.critic.module.rm
            RewardModel.save(out, sd, base_config(rm.backbone), rm.score_mean, rm.score_std)
            self.tokenizer.save_pretrained(out)

    def _resume(self) -> int:
        ckpt = self.resume_from
        if ckpt is None:
            return 0
        state = self.actor.load_state(ckpt / "actor")
        if self.critic is not None:
            self.critic.load_state(ckpt / "critic")
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reuse_logprobs = self.reuse_logprobs and state.get("reuse_logprobs", True)
        if self.ema is not None:
            self.ema.load(ckpt / "ema.safetensors")
        self.policy.refresh(self.actor)
        return int(state["step"])

    # --- score normalisation -------------------------------------------------------------------------
    def score_normalization(self) -> dict:
        """The reward's mean and std on the initial policy's own samples of PPO prompts (Ziegler et al.;
        "The N implementation details of RLHF with PPO"), the same on every process. A fresh run measures
        them; a resumed run reads the ones its checkpoint was trained with."""
        stored = self.resume_from / SCORE_STATS_FILE if self.resume_from is not None else None
        norm = D.broadcast_object(json.loads(stored.read_text()) if D.is_main() and stored and stored.is_file()
                                  else None)
        how = f"kept from {stored}" if norm else "measured on the initial policy's samples"
        norm = norm or self.measure_score_stats()
        if D.is_main():
            print(f"ppo: score normalisation {how}: mean {norm['mean']:.4g}, std {norm['std']:.4g} "
                  f"({norm['samples']} samples)", flush=True)
        return norm

    @torch.no_grad()
    def measure_score_stats(self) -> dict:
        """Score the initial policy's responses to the prompts of the first ⌈ppo.normalize_samples /
        responses_per_step⌉ rollout batches (sampled as those steps sample them); mean and std over every
        process. Every process scores as many micro-batches (the batches split evenly), as ZeRO-3 needs.
        Samples are responses, prompts × n_samples_per_prompt, not independent when n > 1 (both logged).
        text_mean, the text sources' weighted mean on the same samples, starts the critic (critic_head)."""
        scores, text = [], []
        for step in range(math.ceil(self.p.normalize_samples / self.p.responses_per_step)):
            rollout, metadata, episodes = self.step_samples(step)
            per_source = self.reward_parts(rollout, metadata, episodes)
            scores.append(per_source.pop(MODEL))
            text.append(self.rewards.total(per_source) if per_source else torch.zeros_like(scores[-1]))
        scores, text = torch.cat(scores), torch.cat(text)
        mean, var = masked_moments_over_ranks(scores, torch.ones_like(scores, dtype=torch.bool))
        count, text_sum = D.all_reduce_sum([float(len(scores)), float(text.sum())])
        samples = int(count)
        if not var > 0:
            raise RlhfkitError(f"ppo.normalize_scores: the reward gave every one of {samples} samples of the initial "
                               f"policy the same score ({mean:.4g}), so there is no spread to normalise by; "
                               "check the reward model, or set ppo.normalize_scores: false")
        return {"mean": mean, "std": var ** 0.5, "samples": samples, "prompts": samples // self.p.n_samples_per_prompt,
                "text_mean": text_sum / samples}


def run_ppo(cfg: Config, show_progress: bool = True, reward_model: torch.nn.Module | None = None,
            budget: StageBudget | None = None) -> dict:
    return PPOTrainer(cfg, show_progress, reward_model, budget).train()


def _with_accumulation(t, rows_per_process: int):
    """The TrainConfig the backend gets: as many micro-batches per optimizer step as one mini-batch needs."""
    return t.model_copy(update={"gradient_accumulation_steps": max(1, math.ceil(rows_per_process / t.micro_batch_size))})


def _model_token_kl(policy, reference, r, temperature: float) -> torch.Tensor:
    """[B] Σ of log π − log π_ref over the model's own tokens: scoring.response_kl where every response token is
    the model's, without what tools or the environment added to an episode."""
    if r.action_mask is None:
        return response_kl(policy, reference, r, temperature)
    diff = actor_logprobs(policy, r, temperature) - actor_logprobs(reference, r, temperature)
    return torch.where(r.response_mask(), diff, 0.0).sum(1)


def _seed(seed: int, step: int, position: int) -> int:
    """Sampling seed of one prompt: its PPO step (−1: eval) and its place in the step's batch."""
    return int(np.random.default_rng([seed, step + 1, position]).integers(2**62))


"""Scoring rollouts with models that only run forward: token log-probs of a policy, the KL between two,
critic values, reward-model scores (re-tokenizing when the tokenizers differ), and the frozen-model wrapper
that places a model at its precision and ZeRO stage. PPO, the critic-free estimators and `rlhfkit eval`
all score through these."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import Config, FrozenModelConfig
from ..engine import distributed as D
from ..engine.precision import cast_params, torch_dtype
from ..errors import ConfigError
from ..models.configs import model_config_for
from ..models.loading import load_tokenizer, resolve_model_dir
from ..models.reward import RewardModel
from ..sequences import pad_right
from .sampling import Rollout, response_tensor, response_values


def actor_logprobs(forward, r: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """[B, R] log-probs of the response tokens under a TokenLogprobLM (engine or frozen).

    PPO passes its sampling temperature: it optimises, and its KL penalty measures, the tempered
    distribution the rollouts are drawn from (as TRL does), for the actor and the reference alike."""
    flat, _ = forward(r.input_ids, r.lengths, r.token_mask(), temperature)
    return response_tensor(flat.float(), r.response_lengths, r.width)


def response_kl(policy, reference, r: Rollout, temperature: float) -> torch.Tensor:
    """[B] Σ over response tokens of log π − log π_ref: the k1 KL estimate of each response (sampled from π)."""
    return (actor_logprobs(policy, r, temperature) - actor_logprobs(reference, r, temperature)).sum(1)


def critic_values(forward, r: Rollout) -> torch.Tensor:
    return response_values(forward(r.input_ids, r.lengths).float(), r.prompt_lens, r.response_lengths, r.width)


class RewardScorer:
    """RM scores of rollouts, re-tokenizing the text first when actor and RM tokenizers differ."""

    def __init__(self, reward, retokenize: tuple | None = None):
        self.reward = reward
        self.retokenize = retokenize  # (actor tokenizer, reward tokenizer) or None

    def __call__(self, r: Rollout) -> torch.Tensor:
        device = r.input_ids.device
        if self.retokenize is None:
            return self.reward(r.input_ids, r.lengths, r.prompt_lens).float()
        src, dst = self.retokenize
        seqs, prompt_lens = [], []
        for i in range(len(r.lengths)):
            pl, n = int(r.prompt_lens[i]), int(r.lengths[i])
            ids = r.input_ids[i].tolist()
            prompt = dst(src.decode(ids[:pl]), add_special_tokens=False)["input_ids"]
            resp = dst(src.decode(ids[pl:n - int(r.ended[i])]), add_special_tokens=False)["input_ids"]
            resp = resp + [dst.eos_token_id] if r.ended[i] else resp
            seqs.append(np.array(prompt + resp))
            prompt_lens.append(len(prompt))
        ids, lengths = pad_right(seqs, dst.pad_token_id if dst.pad_token_id is not None else dst.eos_token_id)
        return self.reward(ids.to(device), lengths.to(device), torch.tensor(prompt_lens, device=device)).float()


class FrozenModel:
    """A model that only runs forward, without grad: a plain module at its dtype (ZeRO-0), or a DeepSpeed
    ZeRO-3 inference engine whose parameters are partitioned over the processes (optionally on CPU)."""

    def __init__(self, module: nn.Module, fc: FrozenModelConfig):
        module.eval().requires_grad_(False)
        if fc.zero_stage == 3:
            import deepspeed

            zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
            if fc.offload_param:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "zero_optimization": zero, "bf16": {"enabled": fc.dtype == "bfloat16"},
                      "fp16": {"enabled": fc.dtype == "float16"}, "steps_per_print": 10**9}
            self._call = deepspeed.initialize(model=module, config=config)[0]
            self._call.eval()
            self.module = self._call.module
        else:
            self.module = cast_params(module, torch_dtype(fc.dtype), D.device())
            self._call = self.module

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def load_reward_model(path: str, cfg: Config) -> RewardModel:
    mcfg = model_config_for(cfg, path)
    local = resolve_model_dir(mcfg.name_or_path, mcfg, mcfg.revision)
    return RewardModel.from_pretrained(local, dtype=torch.float32, trust_remote_code=mcfg.trust_remote_code)


def tokenizer_pair(cfg: Config, text_tokenizer, text_source: str, scorer_path: str, scorer_name: str):
    """(text tokenizer, scorer tokenizer) for RewardScorer when they differ and ppo.retokenize allows
    re-encoding; None when they agree token for token (same vocabulary and EOS). PPO's reward and eval's
    judges decide it here."""
    scorer_tok = load_tokenizer(model_config_for(cfg, scorer_path))
    if text_tokenizer.get_vocab() == scorer_tok.get_vocab() and text_tokenizer.eos_token_id == scorer_tok.eos_token_id:
        return None
    if not cfg.ppo.retokenize:
        raise ConfigError(f"{text_source} and {scorer_name} ({scorer_path}) use different tokenizers; set "
                          f"ppo.retokenize: true to score the decoded text re-tokenized for {scorer_name}")
    return text_tokenizer, scorer_tok


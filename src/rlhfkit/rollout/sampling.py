"""Rollouts: the hybrid engine's inference side, and the one sequence layout every PPO model reads.

Generation works on left-padded prompts (so every row continues from the same column). Scoring and
training work on the same sequences re-packed right-padded — prompt tokens, then response tokens, then
padding — so positions start at 0 in every row and every mask comes from lengths (GUIDE §2): the same
`gather_last` reads the RM score at the last response token in PPO as in RM training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..config import SamplingSettings, TrainConfig
from ..engine import distributed as D
from ..engine.backend import TrainEngine
from ..engine.precision import torch_dtype
from ..engine.generation import Generation, SamplingConfig, StaticDecoder, decoder_for, generate, resolve_decoding
from ..errors import ConfigError
from ..engine.weights import gathered_weights
from ..models.configs import base_config, dense_config
from ..sequences import length_mask, pad_right, response_token_mask


class RolloutPolicy:
    """A plain inference copy of the actor for sampling: no grad, KV cache, dropout off, LoRA merged in,
    at the rollout dtype (`auto`: the machine's precision), refreshed from the trained weights after every
    update. The training module itself may be ZeRO-3 partitioned, carry unmerged LoRA adapters or hold
    fp32 weights, each of which makes token-by-token sampling slower. `decoding` (ppo.rollout_decoding)
    chooses the decoding loop; the static ones keep their caches and compiled step in `decoder`, valid
    across refreshes because the weights are copied in place.

    `exact` says whether the copy computes exactly the trained actor: a full fine-tune (no LoRA to merge,
    no 4-bit weights to dequantize), at the actor's own precision, without dropout. Then the log-probs
    the sampler saw may stand in for the actor's old log-probs and PPO skips one actor forward per step, as
    long as the numeric paths agree (KV-cached decoding against the full forward: checked in experience.py,
    in bf16 they do not); otherwise the training actor recomputes them, and the rollout dtype only changes
    which tokens are sampled (ppo.tis_cap corrects for that)."""

    def __init__(self, engine: TrainEngine, t: TrainConfig, dtype: torch.dtype, decoding: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.t = t
        config = dense_config(base_config(engine.module.lm))  # QLoRA: sample from dense merged weights
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(D.device())
        self.model.eval().requires_grad_(False)
        self.exact = not t.lora.enabled and dtype == torch_dtype(t.dtype) and t.dropout == 0.0
        self.decoder = decoder_for(self.model, resolve_decoding(decoding), "ppo.rollout_decoding")
        self.refresh(engine)

    @torch.no_grad()
    def refresh(self, engine: TrainEngine) -> None:
        """Copy the actor's current weights in (gathered on every rank under ZeRO-3, LoRA merged)."""
        sd = gathered_weights(engine, self.t, prefix="lm.", merge=True, all_ranks=True)
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(sd))
        if missing:
            raise RuntimeError(f"rollout copy: the actor has no weights for {missing[:5]}")
        for name, p in params.items():
            p.copy_(sd[name])


def sampling_for(settings: SamplingSettings, tokenizer) -> tuple[SamplingConfig, list[int]]:
    """Sampling parameters and stop ids (the tokenizer's EOS plus any configured) from config settings."""
    sampling = SamplingConfig(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
                              do_sample=True)
    return sampling, sorted({tokenizer.eos_token_id, *settings.stop_ids})


def check_ppo_sampling(settings: SamplingSettings) -> None:
    """PPO samples from the full tempered distribution: ppo.sampling.top_p < 1 or top_k > 0 is an error.

    PPO's ratio π_θ/π_old and its KL penalty log π − log π_ref must use the distribution the rollouts were
    drawn from. Sampling from a truncated one while scoring the full one biases the ratio by each
    position's kept probability mass (TRL #7269 measured a mean ratio of 0.90 at top_p=0.8 with no policy
    change). Replaying the truncation when scoring (prime-rl, TRL's vLLM path, DeepSeek-V3.2's "keep
    sampling mask") repairs the ratio but not the KL: a sampled token outside the reference's own nucleus
    has log π_ref = −∞, and scoring the reference on the actor's nucleus makes it a moving target. TRL's
    PPO trainer and the "N implementation details" runs sample with top_k=0, top_p=1.0 for training, as we
    do; truncation stays available to `rlhfkit eval` and `chat`, which only sample."""
    for key, value, off in (("top_p", settings.top_p, 1.0), ("top_k", settings.top_k, 0)):
        if value != off:
            raise ConfigError(
                f"ppo.sampling.{key} is {value}: PPO must sample from the full distribution whose log-probs its "
                f"ratio and KL penalty use, so set ppo.sampling.{key}: {off} (steer sampling with temperature; "
                f"eval.sampling may keep {key})")


def sample_rollouts(model, prompts: list[np.ndarray], seeds: list[int], batch_size: int, pad_id: int,
                    stop_ids: list[int], sampling: SamplingConfig, return_logprobs: bool = False,
                    static: StaticDecoder | None = None) -> list["Rollout"]:
    """One response per prompt, `batch_size` prompts per generate() call, each prompt with its own seed;
    every batch re-packed right-padded (with the sampled tokens' log-probs when asked). `static`: the
    model's static-shape decoder (generate()), None for the dynamic loop."""
    return [to_rollout(generate(model, prompts[i:i + batch_size], pad_id, stop_ids, sampling,
                                seeds[i:i + batch_size], return_logprobs, static), pad_id)
            for i in range(0, len(prompts), batch_size)]


@dataclass
class Rollout:
    """Prompt + response per row, right-padded. lengths = prompt_lens + response_lengths."""

    input_ids: torch.Tensor  # [B, T]
    lengths: torch.Tensor  # [B]
    prompt_lens: torch.Tensor  # [B]
    response_lengths: torch.Tensor  # [B]
    ended: torch.Tensor  # [B] bool: stopped at a stop token
    logprobs: torch.Tensor | None = None  # [B, R] the sampler's log-probs of the response tokens, if kept
    # [B, R] bool: the response tokens the model sampled, in multi-turn episodes (rollout/episodes.py) whose
    # responses also hold what tools or the environment added; None: every response token is the model's
    action_mask: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """R: the per-token response tensors' width."""
        return int(self.response_lengths.max())

    def response_mask(self) -> torch.Tensor:
        """[B, R] bool over the response tokens the model sampled: the ones loss, KL and advantages cover."""
        mask = length_mask(self.response_lengths, self.width)
        return mask if self.action_mask is None else mask & self.action_mask[:, :self.width]

    def token_mask(self) -> torch.Tensor:
        """[B, T] bool over response tokens in sequence positions (the actor's target positions)."""
        return response_token_mask(self.prompt_lens, self.lengths, self.input_ids.shape[1])

    def to(self, device) -> "Rollout":
        return Rollout(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                         for f in fields(self)))


def to_rollout(gen: Generation, pad_id: int) -> Rollout:
    width = gen.prompt_ids.shape[1]
    seqs = [np.concatenate([gen.prompt_ids[i, width - int(pl):].numpy(), gen.response_ids[i, :int(rl)].numpy()])
            for i, (pl, rl) in enumerate(zip(gen.prompt_lengths, gen.response_lengths))]
    ids, lengths = pad_right(seqs, pad_id)
    logprobs = None if gen.response_logprobs is None else gen.response_logprobs[:, :int(gen.response_lengths.max())]
    return Rollout(ids, lengths, gen.prompt_lengths.clone(), gen.response_lengths.clone(), gen.ended.clone(),
                   logprobs)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    def cat_padded(tensors, value):
        width = max(t.shape[1] for t in tensors)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

    logprobs = None if parts[0].logprobs is None else cat_padded([p.logprobs for p in parts], 0.0)
    action_mask = None if parts[0].action_mask is None else cat_padded([p.action_mask for p in parts], False)
    return Rollout(cat_padded([p.input_ids for p in parts], pad_id),
                   *(torch.cat([getattr(p, f) for p in parts]) for f in ("lengths", "prompt_lens", "response_lengths", "ended")),
                   logprobs, action_mask)


def select_rows(r: Rollout, idx: torch.Tensor) -> Rollout:
    """Rows idx, trimmed to their own longest sequence."""
    lengths, response_lengths = r.lengths[idx], r.response_lengths[idx]
    width = int(response_lengths.max())
    logprobs = None if r.logprobs is None else r.logprobs[idx, :width]
    action_mask = None if r.action_mask is None else r.action_mask[idx, :width]
    return Rollout(r.input_ids[idx, : int(lengths.max())], lengths, r.prompt_lens[idx], response_lengths,
                   r.ended[idx], logprobs, action_mask)


def response_tensor(flat: torch.Tensor, response_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Values of the response tokens in row-major order (as `selected_token_logprobs` returns them) →
    [B, width], zero on padding."""
    out = flat.new_zeros(len(response_lengths), width)
    out[length_mask(response_lengths, width)] = flat
    return out


def response_values(values: torch.Tensor, prompt_lens: torch.Tensor, response_lengths: torch.Tensor,
                    width: int) -> torch.Tensor:
    """Critic values per response token [B, width]: V_t is read at the position just before response token
    t (position prompt_len − 1 + t), the state in which the actor chose it. Zero on padding."""
    pos = (prompt_lens[:, None] - 1 + torch.arange(width, device=values.device)[None, :]).clamp(max=values.shape[1] - 1)
    return torch.where(length_mask(response_lengths, width), values.gather(1, pos), 0.0)

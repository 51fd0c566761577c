"""Sampling responses for rollouts and evaluation: left-padded prompts, KV cache, stop at EOS.

Lengths are the truth: a response ends at its first stop token (included) or at max_new_tokens;
everything after is padding whatever its id (pad == eos in many tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_lengths: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, R] right-padded
    response_lengths: torch.Tensor  # [B], stop token included when there is one
    ended: torch.Tensor  # [B] bool: stopped at a stop token (False: hit max_new_tokens)
    # [B, R] log-probs of the sampled tokens under softmax(logits / temperature), 0 on padding; only when
    # generate() was asked for them, which needs untruncated sampling (no top-p / top-k)
    response_logprobs: torch.Tensor | None = None

    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)


def pad_left(prompts: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    out = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, out.shape[1] - len(p):] = torch.as_tensor(p, dtype=torch.long)
    return out, lengths


def response_lengths_from(response_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Length up to and including the first stop token, and whether there was one."""
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    ended = is_stop.any(dim=1)
    first = torch.where(ended, is_stop.int().argmax(dim=1) + 1, torch.full_like(ended, response_ids.shape[1], dtype=torch.long))
    return first, ended


class RowSeededSampler:
    """Sampling whose randomness belongs to each row: Gumbel-max over the warped logits (temperature, top-k,
    top-p), with the noise for row i drawn from its own generator seeded by seeds[i].

    argmax(log p + Gumbel) is an exact sample from p. Because each row draws one noise vector per decoding
    step from its own stream, a row's response does not depend on which other prompts share its batch,
    how prompts are split over processes, or how a run was resumed."""

    def __init__(self, seeds: list[int], sampling: SamplingConfig, device):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


@torch.no_grad()
def generate(model, prompts: list[np.ndarray], pad_id: int, stop_ids: list[int], sampling: SamplingConfig,
             seeds: list[int] | None = None, return_logprobs: bool = False) -> Generation:
    """One response per prompt with the model's KV cache; the model should be in eval mode.

    Sampling is row-seeded (RowSeededSampler): with `seeds` (one per prompt) it is reproducible row by
    row; without, the seeds are drawn from torch's global RNG. do_sample=False decodes greedily.
    return_logprobs keeps each sampled token's log-prob at the sampling temperature (PPO's old log-probs
    when the sampling model is exactly the trained one); they are the sampling distribution's only without
    top-p / top-k truncation, so asking for them with truncation is an error."""
    if return_logprobs and sampling.do_sample and (sampling.top_p < 1.0 or sampling.top_k):
        raise ValueError(f"return_logprobs gives log-probs of the untruncated distribution, but sampling truncates it "
                         f"(top_p={sampling.top_p}, top_k={sampling.top_k})")
    device = next(model.parameters()).device
    prompt_ids, prompt_lengths = pad_left(prompts, pad_id)
    width = prompt_ids.shape[1]
    attention = (torch.arange(width)[None, :] >= (width - prompt_lengths)[:, None]).long()
    if sampling.do_sample:
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        sampler = RowSeededSampler(seeds, sampling, device)
        pick = lambda logits: sampler(None, logits).argmax(-1)  # noqa: E731
    else:
        pick = lambda logits: logits.argmax(-1)  # noqa: E731
    temperature = (sampling.temperature if sampling.do_sample else 1.0) if return_logprobs else None
    response, logprobs = decode(model, prompt_ids.to(device), attention.to(device), sampling.max_new_tokens,
                                stop_ids, pad_id, pick, temperature)
    response = response.cpu()
    lengths, ended = response_lengths_from(response, stop_ids)
    # Whatever the model emitted after the stop is padding: make it so, so nothing downstream reads it.
    real = torch.arange(response.shape[1])[None, :] < lengths[:, None]
    response = torch.where(real, response, pad_id)
    if logprobs is not None:
        logprobs = torch.where(real, logprobs.cpu(), 0.0)
    return Generation(prompt_ids, prompt_lengths, response, lengths, ended, logprobs)


def decode(model, prompt_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
           pad_id: int, pick, logprob_temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoding loop itself: one forward over the left-padded prompts, then one token per step from
    the KV cache, logits only for the last position; stops when every row has emitted a stop token.

    A plain loop instead of `model.generate`, so the row-seeded sampler is just a function of the logits
    (no logits-processor hooks into greedy mode), the prefill projects only its last position onto the
    vocabulary, and positions count real tokens only: a left-padded row sees the positions it would see
    alone. (Measured on SmolLM2 at batch 16, bf16: 185 tokens/s against generate's 178.) Returns the new
    tokens [B, ≤max_new_tokens] (after a row's stop token: pad_id) and, with logprob_temperature, their
    log-probs under log_softmax(logits / logprob_temperature)."""
    from transformers import DynamicCache

    batch = prompt_ids.shape[0]
    mask = attention
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    stop = torch.tensor(list(stop_ids), device=prompt_ids.device)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions,
                past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        token = torch.where(finished, pad_id, pick(logits))
        tokens.append(token)
        if logprob_temperature is not None:
            logp = torch.log_softmax(logits / logprob_temperature, dim=-1)
            logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        finished |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), (torch.stack(logprobs, dim=1) if logprobs else None)

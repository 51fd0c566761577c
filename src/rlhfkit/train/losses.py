"""Loss functions as pure functions over tensors, each unit-tested against hand-computed numbers.

Conventions: batches are right-padded; `lengths[i]` is the number of real tokens in row i; masks are
built from lengths (never from pad ids, which often equal EOS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sequences import length_mask, response_token_mask
from .packing import packed_inputs


class _SelectiveLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[target] in fp32, a chunk of rows at a time: neither the full log-softmax nor a full
    fp32 copy of the logits ever exists. The forward keeps the logits as they came (bf16 stays bf16); the backward
    recomputes each chunk's softmax p, d/dlogits_j = (1[j = target] − p_j) / T."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_rows):
        out = logits.new_empty(logits.shape[0], dtype=torch.float32)
        for s in range(0, logits.shape[0], chunk_rows):
            x = tempered(logits[s:s + chunk_rows], temperature)
            out[s:s + chunk_rows] = torch.log_softmax(x, dim=-1).gather(1, targets[s:s + chunk_rows, None]).squeeze(1)
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        t, n = ctx.temperature, ctx.chunk_rows
        grad_logits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], n):
            g = grad[s:s + n, None] / t
            p = torch.softmax(tempered(logits[s:s + n], t), dim=-1)
            grad_logits[s:s + n] = p.mul_(-g).scatter_add_(1, targets[s:s + n, None], g)
        return grad_logits, None, None, None


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature (no copy for fp32 logits at temperature 1)."""
    x = logits.float()
    return x / temperature if temperature != 1.0 else x


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row, in fp32: logits [..., V], targets [...] → [...].

    Equal to the full fp32 log-softmax's gather (tests/test_selective_logprobs.py), without holding a [..., V]
    fp32 tensor for the backward; chunk_rows (default: default_chunk_rows) bounds the fp32 working set."""
    vocab = logits.shape[-1]
    flat = _SelectiveLogprobs.apply(logits.reshape(-1, vocab), targets.reshape(-1), float(temperature),
                                    chunk_rows or default_chunk_rows(vocab, logits.device))
    return flat.reshape(targets.shape)


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: 64 MiB of fp32 on a CPU (341 rows of a 49k vocabulary; smaller chunks were no faster on a
    loaded 2-core machine), 256 MiB on a GPU (fewer chunks, fewer kernel launches)."""
    return max(1, (2 ** 24 if device.type == "cpu" else 2 ** 26) // vocab)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | ..t) for t in [0, T-1): [B, T-1], computed in fp32."""
    return selective_logprobs(logits[:, :-1], input_ids[:, 1:])


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL over the tokens where loss_mask is True (targets, i.e. positions 1..T-1).

    Returns (mean loss, number of target tokens). loss_mask is [B, T] over *target* positions.
    """
    nll = -token_logprobs(logits, input_ids)
    mask = loss_mask[:, 1:].to(nll.dtype)
    n = mask.sum()
    return (nll * mask).sum() / n.clamp(min=1), n


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """-log σ(r_c - r_r - margin), averaged; plus center_coef·mean((r_c + r_r)²) to keep scores near zero."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    diff = (chosen - rejected).float()
    return {
        "accuracy": (diff > 0).float().mean().item(),
        "margin": diff.mean().item(),
        "chosen_score": chosen.float().mean().item(),
        "rejected_score": rejected.float().mean().item(),
    }


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al.) on summed response log-probs; label_smoothing > 0 is conservative DPO (cDPO).

    logits = β·[(π_c − ref_c) − (π_r − ref_r)];
    loss = −(1−ε)·log σ(logits) − ε·log σ(−logits).
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    stats = {
        "rewards/chosen": chosen_reward.mean().item(),
        "rewards/rejected": rejected_reward.mean().item(),
        "rewards/accuracy": (logits > 0).float().mean().item(),
        "rewards/margin": logits.mean().item(),
    }
    return loss.mean(), stats


def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, prompt_lens: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of the response tokens of each row: [B]."""
    lp = token_logprobs(logits, input_ids)
    mask = response_token_mask(prompt_lens, lengths, input_ids.shape[1])[:, 1:]
    return (lp * mask).sum(1)


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A causal LM's transformer and its LM head (through a peft wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model, inner.get_output_embeddings()


def selected_token_logprobs(model, input_ids: torch.Tensor, lengths: torch.Tensor | None,
                            target_mask: torch.Tensor, temperature: float = 1.0,
                            position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of the selected target tokens, computing vocabulary logits only where they are needed.

    target_mask [B, T] marks target positions (1..T-1). The backbone runs on the whole batch, but the
    LM head and log-softmax run only on the hidden states that predict a selected token: prompt and
    padding positions never pay for a vocabulary-sized projection. Returns (logprobs [N], row of each [N]).
    temperature ≠ 1 gives the log-probs of the tempered distribution softmax(logits / T), the one PPO
    samples from and therefore optimises. position_ids [B, T]: packed rows (train/packing.py), whose
    positions restart at every sequence and separate them; lengths is then not read.
    """
    backbone, head = backbone_and_head(model)
    if position_ids is None:  # no KV cache: a config with use_cache would have the model keep one it never reads
        layout = {"attention_mask": length_mask(lengths, input_ids.shape[1]).long(), "use_cache": False}
    else:
        layout = packed_inputs(position_ids)
    hidden = backbone(input_ids=input_ids, **layout).last_hidden_state
    select = target_mask[:, 1:]
    h = hidden[:, :-1][select]
    targets = input_ids[:, 1:][select]
    logprobs = selective_logprobs(head(h), targets, temperature)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(select)[select]
    return logprobs, rows

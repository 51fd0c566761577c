"""Selective log-probs (train/losses.py selective_logprobs): the chosen token's log-prob without the full
log-softmax, equal to the full fp32 log-softmax's gather in value and gradient.

Tolerances: fp32 inputs, values within 1e-5 and gradients within 1e-6 (both sides compute in fp32; the
difference is summation order). bf16 inputs: both sides upcast the same bf16 values to fp32, so values agree
within 1e-5; the gradients are cast back to bf16 and agree to bf16's resolution (rtol 1e-2, atol 1e-4)."""

import pytest
import torch

from rlhfkit.train.losses import selective_logprobs, token_logprobs

N, V = 37, 1000


def reference(logits, targets, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def value_and_grad(fn, logits, targets, weights):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, targets)
    (out * weights).sum().backward()  # a different weight per row, so each row's gradient is checked
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype, value_tol, grad_tol", [(torch.float32, 1e-5, (0, 1e-6)),
                                                        (torch.bfloat16, 1e-5, (1e-2, 1e-4))])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [None, 1, 8, N])
def test_equal_to_the_full_log_softmax(dtype, value_tol, grad_tol, temperature, chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.randn(N, generator=g)
    got, got_grad = value_and_grad(lambda x, t: selective_logprobs(x, t, temperature, chunk_rows), logits, targets, weights)
    want, want_grad = value_and_grad(lambda x, t: reference(x, t, temperature), logits, targets, weights)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=value_tol)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=grad_tol[0], atol=grad_tol[1])


def test_leading_dimensions_and_token_logprobs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, V, generator=g)
    ids = torch.randint(0, V, (3, 5), generator=g)
    torch.testing.assert_close(token_logprobs(logits, ids), reference(logits[:, :-1], ids[:, 1:]), rtol=0, atol=1e-5)


def test_keeps_no_full_fp32_copy_for_the_backward():
    """What autograd keeps for the backward: the bf16 logits themselves, not an fp32 [N, V] tensor (the full
    log-softmax keeps its fp32 output, 2x the logits' bytes)."""
    logits = torch.randn(N, V).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, V, (N,))

    def saved_bytes(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn(logits, targets)
        return sum(t.numel() * t.element_size() for t in kept if t.dim() == 2)

    assert saved_bytes(selective_logprobs) == N * V * 2
    assert saved_bytes(reference) >= N * V * 4

"""Loss functions against numbers worked out by hand."""

import math

import torch

from rlhfkit.sequences import gather_last, last_token_index, response_token_mask
from rlhfkit.train.batching import collate_pairs, collate_sft, count_sft_targets
from rlhfkit.train.losses import bradley_terry_loss, dpo_loss, pair_metrics, sequence_logprob, sft_loss

EOS = 2  # pad == eos, on purpose


def test_sft_mask_covers_response_tokens_only_token_by_token():
    rows = [{"input_ids": [5, 6, 7, 8, EOS], "prompt_len": 3}, {"input_ids": [5, 9, EOS], "prompt_len": 1}]
    b = collate_sft(rows, pad_id=EOS, response_only=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, EOS], [5, 9, EOS, EOS, EOS]]
    # row 0: prompt 5 6 7 masked; response 8 EOS kept. row 1: 9 EOS kept; the padding EOSes are not.
    assert b["loss_mask"].tolist() == [[False, False, False, True, True], [False, True, True, False, False]]
    assert count_sft_targets(rows) == int(b["loss_mask"][:, 1:].sum()) == 4
    everything = collate_sft(rows, pad_id=EOS, response_only=False)
    assert everything["loss_mask"].tolist() == [[False, True, True, True, True], [False, True, True, False, False]]
    assert count_sft_targets(rows, response_only=False) == 6


def test_sft_loss_is_the_mean_nll_of_masked_targets():
    # Vocab of 3. Uniform logits except where noted; targets are input_ids[:, 1:].
    logits = torch.zeros(1, 3, 3)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0])  # predicts token 1 with p = 3/5
    ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[False, False, True]])  # only the last target (token 1 at position 2) counts
    loss, n = sft_loss(logits, ids, mask)
    assert n.item() == 1
    assert math.isclose(loss.item(), -math.log(3 / 5), rel_tol=1e-6)
    loss_all, n_all = sft_loss(logits, ids, torch.tensor([[False, True, True]]))
    assert n_all.item() == 2  # (-log(1/3) - log(3/5)) / 2
    assert math.isclose(loss_all.item(), (math.log(3) - math.log(3 / 5)) / 2, rel_tol=1e-6)


def test_score_is_read_at_the_last_real_token_with_pad_equal_eos():
    lengths = torch.tensor([5, 3, 1])
    values = torch.tensor([[0.0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    assert last_token_index(lengths).tolist() == [4, 2, 0]
    assert gather_last(values, lengths).tolist() == [4.0, 12.0, 20.0]


def test_bradley_terry_loss_and_metrics_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # diffs 1 and -1: loss = (log(1+e^-1) + log(1+e^1)) / 2
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert math.isclose(bradley_terry_loss(chosen, rejected).item(), expected, rel_tol=1e-6)
    # margin 0.5: diffs become 0.5 and -1.5
    with_margin = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.5))) / 2
    assert math.isclose(bradley_terry_loss(chosen, rejected, margin=0.5).item(), with_margin, rel_tol=1e-6)
    # centering: + 0.1 * mean((2+1)^2, (0+1)^2) = 0.1 * 5
    assert math.isclose(bradley_terry_loss(chosen, rejected, center_coef=0.1).item(), expected + 0.5, rel_tol=1e-6)
    m = pair_metrics(chosen, rejected)
    assert m == {"accuracy": 0.5, "margin": 0.0, "chosen_score": 1.0, "rejected_score": 1.0}


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # logits = 0.5 * ((-1 + 2) - (-3 + 2)) = 1.0
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    assert stats["rewards/accuracy"] == 1.0 and math.isclose(stats["rewards/margin"], 1.0)
    assert math.isclose(stats["rewards/chosen"], 0.5) and math.isclose(stats["rewards/rejected"], -0.5)
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert math.isclose(smooth.item(), expected, rel_tol=1e-6)


def test_sequence_logprob_sums_response_tokens_only():
    logits = torch.zeros(2, 4, 2)  # uniform over 2 tokens: every token has log-prob log(1/2)
    ids = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
    prompt_lens, lengths = torch.tensor([2, 1]), torch.tensor([4, 2])
    # row 0: response tokens at positions 2, 3 → 2 terms; row 1: position 1 → 1 term
    assert torch.allclose(sequence_logprob(logits, ids, prompt_lens, lengths), torch.tensor([2, 1]) * math.log(0.5))
    assert response_token_mask(prompt_lens, lengths, 4).tolist() == [[False, False, True, True], [False, True, False, False]]


def test_pairs_collate_chosen_then_rejected():
    rows = [{"chosen_ids": [1, 2, EOS], "rejected_ids": [1, 3, 4, EOS], "prompt_len": 1}]
    b = collate_pairs(rows, pad_id=EOS)
    assert b["input_ids"].tolist() == [[1, 2, EOS, EOS], [1, 3, 4, EOS]]
    assert b["lengths"].tolist() == [3, 4] and b["prompt_lens"].tolist() == [1, 1]


def test_selected_logprobs_equal_full_logits_path():
    """The fast path (LM head only on selected positions) equals log-softmax over full logits."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_causal_lm
    from rlhfkit.sequences import length_mask
    from rlhfkit.train.losses import selected_token_logprobs

    model = load_causal_lm(ModelConfig(name_or_path="tiny-random"))
    torch.manual_seed(0)
    ids = torch.randint(0, 900, (3, 10))
    lengths, prompt_lens = torch.tensor([10, 6, 8]), torch.tensor([3, 2, 5])
    mask = response_token_mask(prompt_lens, lengths, 10)
    with torch.no_grad():
        logprobs, rows = selected_token_logprobs(model, ids, lengths, mask)
        logits = model(input_ids=ids, attention_mask=length_mask(lengths, 10).long()).logits
    mean, n = sft_loss(logits, ids, mask)
    assert logprobs.numel() == n.item() == 7 + 4 + 3
    assert math.isclose(-logprobs.sum().item() / n.item(), mean.item(), rel_tol=1e-5)
    per_row = torch.zeros(3).index_add_(0, rows, logprobs)
    assert torch.allclose(per_row, sequence_logprob(logits, ids, prompt_lens, lengths), atol=1e-5)
    # at a temperature: the log-probs of softmax(logits / T), the distribution PPO samples from
    with torch.no_grad():
        tempered, _ = selected_token_logprobs(model, ids, lengths, mask, temperature=0.7)
    expected = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(2, ids[:, 1:, None])[..., 0][mask[:, 1:]]
    assert torch.allclose(tempered, expected, atol=1e-5) and not torch.allclose(tempered, logprobs, atol=1e-3)

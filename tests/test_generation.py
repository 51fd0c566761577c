import numpy as np
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.engine.generation import SamplingConfig, generate, pad_left, response_lengths_from
from rlhfkit.models import load_model_and_tokenizer

EOS = 2


def test_lengths_come_from_the_first_stop_token_with_pad_equal_eos():
    ids = torch.tensor([[5, 6, EOS, EOS, EOS], [5, 6, 7, 8, 9], [EOS, EOS, EOS, EOS, EOS]])
    lengths, ended = response_lengths_from(ids, [EOS])
    assert lengths.tolist() == [3, 5, 1] and ended.tolist() == [True, False, True]


def test_pad_left():
    ids, lengths = pad_left([np.array([1, 2, 3]), np.array([4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and lengths.tolist() == [3, 1]


def test_left_padded_batch_gives_the_same_greedy_replies_as_one_by_one():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    model.eval()
    prompts = [np.array(tok("Human: How do I bake bread? Assistant:").input_ids),
               np.array(tok("Hi").input_ids)]
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
    batch = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], greedy)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], tok.pad_token_id, [tok.eos_token_id], greedy)
        n = alone.response_lengths[0]
        assert batch.response_lengths[i] == n
        assert torch.equal(batch.response_ids[i, :n], alone.response_ids[0, :n])
    assert batch.prompt_lengths.tolist() == [len(p) for p in prompts]


def test_row_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    model.eval()
    prompts = [np.array(tok(t).input_ids) for t in ("Tell me a story", "Hi", "What is the capital of France?")]
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    a = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], cfg, seeds=[1, 2, 3])
    b = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], cfg, seeds=[1, 2, 3])
    assert torch.equal(a.response_ids, b.response_ids)
    alone = generate(model, prompts[1:2], tok.pad_token_id, [tok.eos_token_id], cfg, seeds=[2])
    n = int(alone.response_lengths[0])
    assert a.response_lengths[1] == n and torch.equal(a.response_ids[1, :n], alone.response_ids[0, :n])
    other = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], cfg, seeds=[7, 8, 9])
    assert not torch.equal(a.response_ids, other.response_ids)
    # after its stop token a row is padding, whatever the model emitted
    for row, n in zip(a.response_ids, a.response_lengths):
        assert (row[n:] == tok.pad_token_id).all()


def test_row_seeded_sampling_draws_from_the_warped_distribution():
    """Gumbel-max over temperature + top-k logits: empirical first-token frequencies match softmax."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    model.eval()
    prompt = np.array(tok("Tell me a story").input_ids)
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.02, top_k=4)
    n = 3000
    out = generate(model, [prompt] * n, tok.pad_token_id, [tok.eos_token_id], cfg, seeds=list(range(n)))
    with torch.no_grad():
        logits = model(torch.as_tensor(prompt)[None]).logits[0, -1].float() / cfg.temperature
    top = logits.topk(4)
    expected = torch.softmax(top.values, 0)
    for token, p in zip(top.indices.tolist(), expected.tolist()):
        freq = (out.response_ids[:, 0] == token).float().mean().item()
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (token, freq, p)
    assert torch.isin(out.response_ids[:, 0], top.indices).all()  # nothing outside the top-k


def test_greedy_decoding_matches_transformers_generate():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    model.eval()
    prompts = [np.array(tok("Human: How do I bake bread? Assistant:").input_ids), np.array(tok("Hi").input_ids)]
    ours = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], SamplingConfig(max_new_tokens=10, do_sample=False))
    ids, lengths = pad_left(prompts, tok.pad_token_id)
    attention = (torch.arange(ids.shape[1])[None, :] >= (ids.shape[1] - lengths)[:, None]).long()
    theirs = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=10, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    for i in range(2):
        n = int(ours.response_lengths[i])
        assert torch.equal(ours.response_ids[i, :n], theirs[i, :n])

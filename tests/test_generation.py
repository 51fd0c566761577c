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


def test_sampling_is_reproducible_with_a_generator():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    model.eval()
    prompts = [np.array(tok("Tell me a story").input_ids)] * 3
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    a = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], cfg, torch.Generator().manual_seed(1))
    b = generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a.response_ids, b.response_ids)
    # after its stop token a row is padding, whatever the model emitted
    for row, n in zip(a.response_ids, a.response_lengths):
        assert (row[n:] == tok.pad_token_id).all()

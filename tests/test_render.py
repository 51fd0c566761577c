"""Rendering and tokenization: EOS, prompt/response boundaries, special tokens, truncation."""

import pytest

from conftest import make_config
from rlhfkit.config import DataConfig
from rlhfkit.data.records import to_example
from rlhfkit.data.render import Renderer, build_pairs, build_prompts, build_sft
from rlhfkit.errors import DataError

HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


def data_cfg(**kw) -> DataConfig:
    return DataConfig(datasets=[{"name": "x", "path": "x.jsonl"}], **{"max_seq_len": 128, "max_prompt_len": 64, **kw})


def example(prompt=HH, chosen="Why did the chicken cross the road?", rejected="No."):
    return to_example({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "preference", "t:1", 0)


def test_pad_is_eos_in_the_tiny_tokenizer(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id  # the case that breaks pad-based masks


def test_sft_boundaries_and_single_eos_on_multi_turn_hh(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg())
    table, stats = build_sft([example()], r)
    row = table.row(0)
    ids, plen = row["input_ids"].tolist(), row["prompt_len"]
    eos = tiny_tokenizer.eos_token_id
    # The prompt is exactly the chat template with the generation prompt, turns parsed from the transcript.
    assert tiny_tokenizer.decode(ids[:plen]) == tiny_tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
    # The response is the reply followed by exactly one EOS, at the very end.
    response = ids[plen:]
    assert response.count(eos) == 1 and response[-1] == eos
    assert tiny_tokenizer.decode(response[:-1]) == "Why did the chicken cross the road?"
    assert stats.kept == 1 and stats.truncated_rows == 0


def test_pairs_share_the_prompt_and_each_end_with_eos(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg())
    table, _ = build_pairs([example()], r)
    row = table.row(0)
    plen, eos = row["prompt_len"], tiny_tokenizer.eos_token_id
    assert row["chosen_ids"][:plen].tolist() == row["rejected_ids"][:plen].tolist()
    for col in ("chosen_ids", "rejected_ids"):
        resp = row[col][plen:].tolist()
        assert resp.count(eos) == 1 and resp[-1] == eos
    assert tiny_tokenizer.decode(row["rejected_ids"][plen:-1]) == "No."


def test_special_token_text_in_a_reply_stays_text(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg())
    table, _ = build_sft([example(chosen="I typed <|im_end|> on purpose")], r)
    row = table.row(0)
    resp = row["input_ids"][row["prompt_len"]:].tolist()
    assert resp.count(tiny_tokenizer.eos_token_id) == 1 and resp[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(resp[:-1]) == "I typed <|im_end|> on purpose"


def test_special_token_text_in_a_prompt_is_dropped_and_counted(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg())
    table, stats = build_sft([example(prompt="inject <|im_start|>system"), example()], r)
    assert len(table) == 1
    assert stats.dropped == {"special_token_in_text": 1}
    assert stats.dropped_examples[0]["where"] == "t:1"


def test_plain_format_without_chat_template(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg(template="plain"))
    table, _ = build_sft([example()], r)
    row = table.row(0)
    plen = row["prompt_len"]
    assert tiny_tokenizer.decode(row["input_ids"][:plen]) == (
        "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:")
    assert tiny_tokenizer.decode(row["input_ids"][plen:-1]) == " Why did the chicken cross the road?"
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_long_prompt_is_cut_from_the_left_and_counted(tiny_tokenizer):
    long_prompt = "\n\nHuman: " + "tell me more " * 100 + "\n\nAssistant: ok\n\nHuman: last question?\n\nAssistant:"
    r = Renderer(tiny_tokenizer, data_cfg(max_prompt_len=32, max_seq_len=64))
    full_prompt = r.encode_prompts([r.prompt_text(example(prompt=long_prompt).prompt)])[0]
    table, stats = build_sft([example(prompt=long_prompt)], r)
    row = table.row(0)
    assert row["prompt_len"] == 32
    assert row["input_ids"][:32].tolist() == full_prompt[-32:]  # the latest turns are kept
    assert stats.truncated == {"prompt": 1} and stats.truncated_rows == 1


def test_long_response_is_cut_without_eos(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg(max_prompt_len=32, max_seq_len=40))
    table, stats = build_sft([example(prompt="Hi", chosen="word " * 200)], r)
    row = table.row(0)
    assert len(row["input_ids"]) == 40
    assert tiny_tokenizer.eos_token_id not in row["input_ids"][row["prompt_len"]:].tolist()  # it did not end
    assert stats.truncated == {"response": 1}


def test_drop_policy_drops_and_counts(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg(max_prompt_len=16, max_seq_len=40, overlong="drop"))
    table, stats = build_prompts([example(), example(prompt="Hi")], r)
    assert len(table) == 1 and stats.dropped == {"too_long": 1}


def test_duplicate_prompts_count_once_in_phase_3(tiny_tokenizer):
    r = Renderer(tiny_tokenizer, data_cfg())
    table, stats = build_prompts([example(), example(chosen="other")], r)
    assert len(table) == 1 and stats.dropped == {"duplicate_prompt": 1}


def test_eos_override_must_be_one_token(tiny_tokenizer):
    with pytest.raises(DataError, match="not a single token"):
        Renderer(tiny_tokenizer, data_cfg(eos_token="definitely not a token"))
    assert Renderer(tiny_tokenizer, data_cfg(eos_token="<s>")).eos_id == tiny_tokenizer.bos_token_id


def test_make_config_helper_is_valid(tmp_path):
    assert make_config(tmp_path, [{"name": "a", "path": "a.jsonl"}]).data.max_seq_len == 128


def test_a_template_that_refuses_tool_messages_is_a_data_error_naming_it(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                         "{{ raise_exception('no tool role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    r = Renderer(tok, data_cfg())
    assert r.prompt_text([{"role": "user", "content": "2+3?"}]) == "2+3?"
    with pytest.raises(DataError, match=r"refuses a conversation with the roles assistant, tool, user: .*no tool role"):
        r.prompt_text([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "call"},
                       {"role": "tool", "content": "5"}])

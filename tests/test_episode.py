"""Episodes as token ids: the model's sampled ids are kept, only what follows its turn is encoded."""

import copy

import pytest

from rlhfkit.agents.calls import tool_message
from rlhfkit.agents.episode import EpisodeTokens, continuation_ids

QUESTION = [{"role": "user", "content": "What is 6 * 7?"}]
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>'


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_an_episode_is_the_sampled_ids_plus_the_encoded_continuation(tiny_tokenizer):
    tok = tiny_tokenizer
    episode = EpisodeTokens(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
    sampled = encode(tok, CALL) + [tok.eos_token_id]
    episode.add_sampled(sampled)
    added = continuation_ids(tok, [tool_message("calculator", "42")], turn_ended_with=tok.eos_token)
    episode.add_context(added)
    assert tok.decode(added) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    conversation = QUESTION + [{"role": "assistant", "content": CALL}, tool_message("calculator", "42")]
    # the kept ids spell the conversation as the template renders it, ready for the next turn
    assert tok.decode(episode.ids) == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert [i for i, own in zip(episode.ids, episode.own) if own] == sampled
    assert episode.own == [False] * episode.prompt_len + [True] * len(sampled) + [False] * len(added)


def test_re_encoding_the_conversation_changes_ids_that_were_kept(tiny_tokenizer):
    """A model may sample a word in pieces that the tokenizer would merge: decode-then-encode would train on
    ids that were never sampled."""
    tok = tiny_tokenizer
    merged = encode(tok, " the")
    pieces = [tok.convert_tokens_to_ids(t) for t in ("Ġ", "t", "h", "e")]
    assert len(merged) == 1 and tok.unk_token_id not in pieces and tok.decode(pieces) == " the"
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    episode = EpisodeTokens(prompt)
    episode.add_sampled(encode(tok, "It is") + pieces + encode(tok, " answer") + [tok.eos_token_id])
    episode.add_context(continuation_ids(tok, [{"role": "user", "content": "Sure?"}], turn_ended_with=tok.eos_token))
    conversation = QUESTION + [{"role": "assistant", "content": "It is the answer"}, {"role": "user", "content": "Sure?"}]
    rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert tok.decode(episode.ids) == rendered  # the same text ...
    assert encode(tok, rendered) != episode.ids  # ... but not the same ids once re-encoded
    assert pieces == episode.ids[episode.prompt_len + len(encode(tok, "It is")):][:4]


def test_a_turn_cut_before_its_end_gets_the_templates_end_as_context(tiny_tokenizer):
    added = continuation_ids(tiny_tokenizer, [tool_message("calculator", "42")])
    assert tiny_tokenizer.decode(added).startswith("<|im_end|>\n<|im_start|>tool\n42")


def test_tools_and_a_default_system_prompt_stay_in_the_prefix(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
                         "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe helpful.<|im_end|>\n{% endif %}"
                         + tiny_tokenizer.chat_template)
    schema = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    added = continuation_ids(tok, [tool_message("calculator", "42")], tok.eos_token, tools=[schema])
    assert tok.decode(added) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_templates_that_cannot_be_continued_say_why(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # a header that changes with every message: what came before changes once more follows
    tok.chat_template = "{{ messages | length }} messages\n" + tiny_tokenizer.chat_template
    with pytest.raises(ValueError, match="renders an assistant turn differently when messages follow it"):
        continuation_ids(tok, [tool_message("calculator", "42")], turn_ended_with="<|im_end|>")
    with pytest.raises(ValueError, match="not '</s>', the end the model's turn had"):
        continuation_ids(tiny_tokenizer, [tool_message("calculator", "42")], turn_ended_with="</s>")

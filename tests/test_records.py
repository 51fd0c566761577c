import pytest

from rlhfkit.data.records import BadRecord, detect_format, parse_hh_transcript, split_hh_pair, to_example


def test_multi_turn_hh_transcript_becomes_turns():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]


def test_split_raw_hh_pair_at_last_shared_assistant_marker():
    prompt = "\n\nHuman: Say something\n\nAssistant:"
    # The rejected reply itself contains "Assistant:" text; the split must not be fooled by it.
    chosen, rejected = prompt + " Sure.", prompt + " Human: no. Assistant: yes"
    assert split_hh_pair(chosen, rejected) == (prompt, " Sure.", " Human: no. Assistant: yes")


def test_raw_hh_record_is_read_as_preference():
    raw = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}
    assert detect_format(raw) == "preference"
    ex = to_example(raw, "preference", "f:1", 0)
    assert ex.prompt == [{"role": "user", "content": "Hi"}] and ex.chosen == "Hello" and ex.rejected == "Go away"


def test_plain_prompt_and_message_list():
    ex = to_example({"prompt": "What is 2+2?", "response": " 4 "}, "sft", "f:1", 0)
    assert ex.prompt == [{"role": "user", "content": "What is 2+2?"}] and ex.chosen == "4"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert to_example({"prompt": msgs}, "prompt", "f:1", 0).prompt == msgs


@pytest.mark.parametrize(
    "raw, reason",
    [
        ({"prompt": "q", "chosen": "a"}, "missing_field"),
        ({"prompt": "q", "chosen": "a", "rejected": "   \n"}, "empty_response"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "wrong_type"),
        ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, "wrong_type"),
        ({"prompt": "\n\nHuman: q\n\nAssistant: a", "chosen": "a", "rejected": "b"}, "bad_transcript"),
        (["not", "an", "object"], "not_an_object"),
        ({"prompt": [{"role": "narrator", "content": "Once"}, {"role": "user", "content": "q"}], "chosen": "a",
          "rejected": "b"}, "unknown_role"),
    ],
)
def test_bad_records_say_why_and_where(raw, reason):
    with pytest.raises(BadRecord) as err:
        to_example(raw, "preference", "data.jsonl:12", 0)
    assert err.value.reason == reason
    assert "data.jsonl:12" in str(err.value)


def test_unknown_role_is_named_with_the_roles_allowed():
    raw = {"prompt": [{"role": "user", "content": "q"}, {"role": "Narrator", "content": "x"}], "response": "a"}
    with pytest.raises(BadRecord, match=r"prompt\[1\] has the role 'Narrator'; a message's role must be one of "
                                        r"system, user, assistant, tool"):
        to_example(raw, "sft", "f:1", 0)


def test_a_tool_message_is_a_turn_of_a_tool_use_transcript():
    raw = {"messages": [{"role": "user", "content": "2+3?"},
                        {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": {}}</tool_call>'},
                        {"role": "tool", "name": "calculator", "content": "5"},
                        {"role": "assistant", "content": "#### 5"}]}
    ex = to_example(raw, "sft", "f:1", 0)
    assert [t["role"] for t in ex.prompt] == ["user", "assistant", "tool"] and ex.chosen == "#### 5"
    assert ex.prompt[2]["name"] == "calculator"  # kept for templates that render a tool message's name


# --- metadata: the fields a format does not read -------------------------------------------------------

def test_a_gsm8k_record_keeps_its_id_and_final_answer_as_metadata():
    raw = {"id": "gsm-1", "prompt": "Q?", "response": "2 + 2 = 4\n#### 4", "final_answer": "4"}
    assert to_example(raw, "sft", "f:1", 0).metadata == {"id": "gsm-1", "final_answer": "4"}


def test_a_record_without_other_fields_has_empty_metadata():
    assert to_example({"prompt": "Q?"}, "prompt", "f:1", 0).metadata == {}
    assert to_example({"prompt": "Q?", "chosen": "a", "rejected": "b"}, "preference", "f:1", 0).metadata == {}
    raw_hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"}
    assert to_example(raw_hh, "preference", "f:1", 0).metadata == {}


def test_metadata_is_what_the_format_does_not_read():
    """A prompt record's `response` (e.g. an SFT file read as prompts) is not read, so it is metadata."""
    raw = {"prompt": "Q?", "response": "A.", "reference": "R"}
    assert to_example(raw, "sft", "f:1", 0).metadata == {"reference": "R"}
    assert to_example(raw, "prompt", "f:1", 0).metadata == {"response": "A.", "reference": "R"}


def test_metadata_keeps_json_values_as_they_are_and_leaves_out_the_rest():
    import datetime

    nested = {"turns": ["a", "b"], "score": 0.5, "n": 3, "ok": True, "none": None, "deep": {"k": [1, {"x": "ü"}]}}
    raw = {"prompt": "Q?", **nested, "when": datetime.date(2024, 1, 2), "blob": b"\x00", "bad": {1: "int key"}}
    meta = to_example(raw, "prompt", "f:1", 0).metadata
    assert meta == nested and type(meta["n"]) is int

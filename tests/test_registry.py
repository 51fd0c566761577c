"""The hub dataset registry: each field mapping on a row shaped like the real dataset's."""

import pytest

from conftest import make_config
from rlhfkit.data.prepare import prepare
from rlhfkit.data.records import BadRecord, to_example
from rlhfkit.data.registry import REGISTRY
from rlhfkit.errors import DataError

ROWS = {
    "Dahoas/rm-static": {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go", "response": " Hello"},
    "Dahoas/full-hh-rlhf": {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Go", "response": " Hello"},
    "Dahoas/synthetic-instruct-gptj-pairwise": {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
    "yitingxie/rlhf-reward-datasets": {"prompt": "\n\nHuman: Hi", "chosen": "Assistant: Hello", "rejected": "Assistant: Go"},
    "openai/webgpt_comparisons": {"question": {"full_text": "Hi"}, "answer_0": "Go [1]", "answer_1": "Hello (2)",
                                  "score_0": -1.0, "score_1": 1.0},
    "stanfordnlp/SHP": {"history": "Hi", "human_ref_A": "Hello", "human_ref_B": "Go", "labels": 1},
    "Anthropic/hh-rlhf": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"},
    "pvduy/sharegpt_alpaca_oa_vicuna_format": {"prompt": "USER: Hi ASSISTANT:", "label": "Hello"},
    "wangrui6/Zhihu-KOL": {"INSTRUCTION": "Hi", "RESPONSE": "Hello"},
    "Cohere/miracl-zh-queries-22-12": {"query": "Hi", "positive_passages": [{"text": "Hello"}],
                                       "negative_passages": [{"text": "Go"}]},
    "Hello-SimpleAI/HC3-Chinese": {"question": "Hi", "human_answers": ["Hello"], "chatgpt_answers": ["Go"]},
    "mkqa-Chinese": {"queries": {"zh_cn": "Hi"}, "answers": {"zh_cn": [{"text": "Hello"}]}},
    "mkqa-Japanese": {"queries": {"ja": "Hi"}, "answers": {"ja": [{"text": "Hello"}]}},
    "Cohere/miracl-ja-queries-22-12": {"query": "Hi", "positive_passages": [{"text": "Hello"}],
                                       "negative_passages": [{"text": "Go"}]},
    "lmqg/qg_jaquad": {"question": "Hi", "sentence": "Hello"},
    "lmqg/qag_jaquad": {"questions": ["Hi"], "paragraph": "Hello"},
}


def test_every_registered_dataset_has_a_test_row():
    assert set(ROWS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_mapping_gives_a_valid_record(name):
    spec = REGISTRY[name]
    ex = to_example(spec.convert(ROWS[name]), spec.format, f"hub:{name}#0", 0)
    assert ex.prompt[-1] == {"role": "user", "content": "Hi"}
    assert ex.chosen == "Hello"
    if spec.format == "preference":
        assert ex.rejected == "Go"


def test_webgpt_tie_is_a_counted_skip():
    row = dict(ROWS["openai/webgpt_comparisons"], score_0=0.0, score_1=0.0)
    with pytest.raises(BadRecord) as err:
        REGISTRY["openai/webgpt_comparisons"].convert(row)
    assert err.value.reason == "tie"


def test_shp_label_zero_prefers_b():
    row = dict(ROWS["stanfordnlp/SHP"], labels=0)
    assert REGISTRY["stanfordnlp/SHP"].convert(row)["chosen"] == "Go"


def test_hub_dataset_offline_is_a_clear_error(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config(tmp_path, [{"name": "Dahoas/rm-static"}])
    with pytest.raises(DataError, match=r"Dahoas/rm-static.*unreachable.*eval_path"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


def test_unknown_dataset_without_path_is_a_clear_error(tmp_path, tiny_tokenizer):
    cfg = make_config(tmp_path, [{"name": "nobody/nothing"}])
    with pytest.raises(DataError, match="not a known hub dataset"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)

"""Named hub datasets (the ones DeepSpeed-Chat knows) and how their fields map onto our formats.

Each entry says which splits hold train/eval data and converts one raw row into the uniform
{prompt, chosen, rejected} / {prompt, response} record, or raises BadRecord (for example a tie).
They load through `datasets` (offline, from its cache); where neither has them, a clear error says what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .hf_datasets import load_hub
from .records import BadRecord


@dataclass(frozen=True)
class HubDataset:
    format: str  # preference | sft | prompt
    convert: Callable[[dict], dict]
    train_split: str = "train"
    eval_split: str | None = "test"
    config_name: str | None = None
    hub_id: str | None = None  # when the registry name is not the hub id (mkqa-Chinese → mkqa)


def _identity(row):
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def _after_last_assistant(text: str) -> str:
    return text.split("Assistant:")[-1]


def _yitingxie(row):
    # prompt lacks the final "Assistant:"; chosen/rejected carry it in front of the reply.
    return {
        "prompt": row["prompt"].rstrip() + "\n\nAssistant:",
        "chosen": _after_last_assistant(row["chosen"]),
        "rejected": _after_last_assistant(row["rejected"]),
    }


_CITATION = re.compile(r" ?[\(\[][^\)\]]*?[\)\]]")


def _webgpt(row):
    s0, s1 = row["score_0"], row["score_1"]
    if s0 == s1:
        raise BadRecord("tie", "both answers have the same score")
    good, bad = (row["answer_0"], row["answer_1"]) if s0 > s1 else (row["answer_1"], row["answer_0"])
    # Answers cite their sources as [1], (2); the prompt has no sources, so the markers are noise.
    return {"prompt": row["question"]["full_text"], "chosen": _CITATION.sub("", good), "rejected": _CITATION.sub("", bad)}


def _shp(row):
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    return {"prompt": row["history"], "chosen": chosen, "rejected": rejected}


def _sharegpt(row):
    # "USER: ... ASSISTANT: ... USER: ... ASSISTANT:" → hh transcript markers.
    text = re.sub(r"\s*USER:\s*", "\n\nHuman: ", row["prompt"])
    text = re.sub(r"\s*ASSISTANT:\s*", "\n\nAssistant: ", text).rstrip()
    return {"prompt": text, "response": row["label"]}


def _miracl(row):
    if not row["positive_passages"] or not row["negative_passages"]:
        raise BadRecord("missing_field", "no positive or no negative passage")
    return {"prompt": row["query"], "chosen": row["positive_passages"][0]["text"],
            "rejected": row["negative_passages"][0]["text"]}


def _hc3(row):
    if not row["human_answers"] or not row["chatgpt_answers"]:
        raise BadRecord("missing_field", "no human or no chatgpt answer")
    return {"prompt": row["question"], "chosen": row["human_answers"][0], "rejected": row["chatgpt_answers"][0]}


def _mkqa(lang):
    def convert(row):
        answers = row["answers"][lang]
        if not answers or not answers[0].get("text"):
            raise BadRecord("empty_response", f"no {lang} answer")
        return {"prompt": row["queries"][lang], "response": answers[0]["text"]}
    return convert


REGISTRY: dict[str, HubDataset] = {
    "Dahoas/rm-static": HubDataset("preference", _identity),
    "Dahoas/full-hh-rlhf": HubDataset("preference", _identity),
    "Dahoas/synthetic-instruct-gptj-pairwise": HubDataset("preference", _identity, eval_split=None),
    "yitingxie/rlhf-reward-datasets": HubDataset("preference", _yitingxie),
    "openai/webgpt_comparisons": HubDataset("preference", _webgpt, eval_split=None),
    "stanfordnlp/SHP": HubDataset("preference", _shp, eval_split="validation"),
    "Anthropic/hh-rlhf": HubDataset("preference", lambda r: {"chosen": r["chosen"], "rejected": r["rejected"]}),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": HubDataset("sft", _sharegpt),
    "wangrui6/Zhihu-KOL": HubDataset("sft", lambda r: {"prompt": r["INSTRUCTION"], "response": r["RESPONSE"]},
                                     eval_split=None),
    "Cohere/miracl-zh-queries-22-12": HubDataset("preference", _miracl, eval_split="dev"),
    "Hello-SimpleAI/HC3-Chinese": HubDataset("preference", _hc3, eval_split=None, config_name="all"),
    "mkqa-Chinese": HubDataset("sft", _mkqa("zh_cn"), eval_split=None, hub_id="mkqa"),
    "mkqa-Japanese": HubDataset("sft", _mkqa("ja"), eval_split=None, hub_id="mkqa"),
    "Cohere/miracl-ja-queries-22-12": HubDataset("preference", _miracl, eval_split="dev"),
    "lmqg/qg_jaquad": HubDataset("sft", lambda r: {"prompt": r["question"], "response": r["sentence"]},
                                 eval_split="validation"),
    "lmqg/qag_jaquad": HubDataset("sft", lambda r: {"prompt": r["questions"][0], "response": r["paragraph"]},
                                  eval_split="validation"),
}


def load_hub_split(name: str, split: str):
    """Load one split through `datasets` (from its cache where the hub is unreachable; data/hf_datasets.py)."""
    spec = REGISTRY[name]
    return load_hub(spec.hub_id or name, f"dataset {name!r}", spec.config_name, split=split,
                    local_hint="or give its records, converted to rlhfkit's fields as below, as the files of "
                               "`path:` / `eval_path:`")


def iter_hub_records(name: str, split: str):
    """Yield (location, uniform record or BadRecord) for one hub split."""
    spec = REGISTRY[name]
    ds = load_hub_split(name, split)
    for i, row in enumerate(ds):
        where = f"hub:{name}[{split}]#{i}"
        try:
            yield where, spec.convert(row)
        except BadRecord as e:
            yield where, BadRecord(e.reason, e.detail, where)
        except (KeyError, IndexError, TypeError) as e:
            yield where, BadRecord("missing_field", f"unexpected row shape: {e!r}", where)


def hub_fingerprint(name: str, split: str) -> str:
    return getattr(load_hub_split(name, split), "_fingerprint", f"{name}:{split}")

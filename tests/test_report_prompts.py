"""The HTML report shows each sample's prompt as its turns (role, then the message as the user or model wrote
it), not as the template's raw text with its special tokens, cut mid-word."""

import html
import re

import pytest

from conftest import pref_records, write_jsonl

SYSTEM = "Answer briefly."


def report_of(tmp_path, **data):
    """A real eval of the tiny model on multi-turn hh prompts (phase 3), then its report."""
    from rlhfkit.config import Config
    from rlhfkit.pipeline import evaluate_and_report

    prompts = write_jsonl(tmp_path / "prefs.jsonl", pref_records(30))
    cfg = Config.model_validate({
        "run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "tiny-random"},
        "data": {"datasets": [{"name": "d", "path": str(prompts), "phases": [3]}], "cache_dir": str(tmp_path / "cache"),
                 "max_seq_len": 128, "eval_fraction": 0.2, "system_prompt": SYSTEM, **data},
        "eval": {"policy": "tiny-random", "baseline": "tiny-random", "max_prompts": 3, "batch_size": 3,
                 "sampling": {"max_new_tokens": 4}, "rewards": [{"type": "regex", "pattern": "a"}]}})
    evaluate_and_report(cfg, show_progress=False)
    return (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def sample_prompts(page: str) -> list[list[tuple[str, str]]]:
    """(role label, text) of each turn of each sample's prompt."""
    prompts = re.findall(r'<div class="prompt">(.*?)</div></div><div class="pair">', page, re.S)
    return [[(html.unescape(role), html.unescape(text)) for role, text in
             re.findall(r'<span class="role">(.*?)</span><pre>(.*?)</pre>', p, re.S)] for p in prompts]


@pytest.mark.parametrize("template", ["auto", "plain"])
def test_each_sample_prompt_is_shown_as_its_turns(tmp_path, template):
    """Old code: `<|im_start|>system\\nAnswer briefly.<|im_end|>\\n<|im_start|>user\\n…` (or "Human: …") in one
    block, its last 1200 characters."""
    page = report_of(tmp_path, template=template, max_prompt_len=100)
    prompts = sample_prompts(page)
    assert len(prompts) == 3
    for turns in prompts:
        assert [role for role, _ in turns] == ["system", "user", "assistant", "user"]
        (_, system), (_, first), (_, reply), (_, last) = turns
        assert system == SYSTEM and reply == "With flour."
        assert re.fullmatch(r"Question p\d+: how do I bake bread\?", first) and re.fullmatch(r"And then \d+\?", last)
    assert "im_start" not in page and "im_end" not in page and "Human:" not in page


def test_a_prompt_truncated_to_max_prompt_len_shows_where_it_was_cut(tmp_path):
    page = report_of(tmp_path, max_prompt_len=24)
    for turns in sample_prompts(page):
        assert turns[0][0].endswith("(cut to data.max_prompt_len)") and turns[0][1].startswith("…")
        assert turns[-1][0] == "user" and re.fullmatch(r"And then \d+\?", turns[-1][1])
        assert all("im_start" not in text and "im_end" not in text for _, text in turns)

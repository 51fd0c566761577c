"""Prompt records' metadata (the fields a format does not read) from the data files through phase 3 to the
reward, and `rlhfkit eval` judged by text rewards (eval.rewards), with and without a reward model."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from rlhfkit.config import Config
from rlhfkit.data.table import TokenTable
from rlhfkit.eval.compare import format_table, run_eval
from rlhfkit.train.common import stage_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k_like(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "response": f"{i} + {i} = {2 * i}\n#### {2 * i}",
             "final_answer": str(2 * i), "level": i % 3} for i in range(n)]


def config(tmp_path: Path, data_file: Path, **extra) -> Config:
    raw = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "tiny-random"},
           "data": {"datasets": [{"name": "d", "path": str(data_file), "format": "sft", "phases": [3]}],
                    "cache_dir": str(tmp_path / "cache"), "max_seq_len": 96, "max_prompt_len": 48,
                    "eval_fraction": 0.2}}
    for section, values in extra.items():
        raw[section] = values
    return Config.model_validate(raw)


def test_a_json_column_round_trips_through_the_file(tmp_path):
    table = TokenTable({"prompt_ids": [[1, 2], [3]]}, json_columns={"metadata": [{"a": "ü", "n": [1, 2]}, {}]})
    table.save(tmp_path / "t.npz")
    back = TokenTable.load(tmp_path / "t.npz")
    assert back.row(0)["metadata"] == {"a": "ü", "n": [1, 2]} and back.row(1)["metadata"] == {}
    assert back.row(1)["prompt_ids"].tolist() == [3]


def test_metadata_rides_with_phase3_prompts_in_train_and_eval_and_through_the_cache(tmp_path):
    records = gsm8k_like(40)
    data = write_jsonl(tmp_path / "gsm.jsonl", records)
    by_id = {r["id"]: r for r in records}
    for attempt in range(2):  # built, then read back from the cache
        train, evals, _ = stage_data(config(tmp_path / f"try{attempt}", data), 3, False)
        assert len(train) + len(evals) == 40 and len(evals) > 0
        for table in (train, evals):
            for i in range(len(table)):
                meta = table.row(i)["metadata"]
                assert set(meta) == {"id", "final_answer", "level"}  # prompt and response are not metadata
                assert meta["final_answer"] == by_id[meta["id"]]["final_answer"]


def test_a_record_without_other_fields_has_empty_metadata(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {i}."} for i in range(20)])
    train, _, _ = stage_data(config(tmp_path, data, data={"datasets": [{"name": "p", "path": str(data)}],
                                                           "cache_dir": str(tmp_path / "cache"), "eval_fraction": 0.2}),
                             3, False)
    assert all(train.row(i)["metadata"] == {} for i in range(len(train)))


@pytest.mark.skipif(not (SHARED / "sft" / "gsm8k_train.jsonl.gz").is_file(),
                    reason="../shared/data is absent: the real GSM8K file is not here")
def test_real_gsm8k_prompts_carry_their_final_answer(tmp_path):
    cfg = config(tmp_path, SHARED / "sft" / "gsm8k_train.jsonl.gz")
    cfg.data.datasets[0].max_records = 50
    train, _, _ = stage_data(cfg, 3, False)
    answers = [train.row(i)["metadata"]["final_answer"] for i in range(len(train))]
    assert len(answers) >= 40 and all(a.lstrip("-").replace(".", "").isdigit() for a in answers)


def test_eval_judges_by_text_rewards_alone_without_a_reward_model(tmp_path):
    """No RM anywhere: eval.rewards judge. The reward means equal what the written generations give."""
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_like(30))
    test_file = write_jsonl(tmp_path / "test.jsonl", [{"prompt": r["prompt"], "final_answer": r["final_answer"]}
                                                       for r in gsm8k_like(6)])
    cfg = config(tmp_path, data, eval={
        "policy": "tiny-random", "baseline": "tiny-random", "prompt_sets": ["phase3", str(test_file)],
        "max_prompts": 6, "batch_size": 3, "sampling": {"max_new_tokens": 8},
        "rewards": [{"type": "gsm8k", "name": "accuracy"}, {"type": "regex", "pattern": "[aeiou]", "name": "vowel"}]})
    results = run_eval(cfg, show_progress=False)
    assert results["reward_model"] is None and results["judges"] == ["accuracy", "vowel"]
    generations = [json.loads(line) for line in (tmp_path / "run" / "eval" / "generations.jsonl").read_text().splitlines()]
    for name, s in results["sets"].items():
        rows = [g for g in generations if g["set"] == name]
        assert s["prompts"] == len(rows) > 0 and "rm_gain" not in s
        vowel = [float(any(c in "aeiou" for c in g["final"])) for g in rows]
        assert s["vowel_final_score"] == pytest.approx(np.mean(vowel))
        assert s["vowel_final_score"] == pytest.approx(np.mean([g["vowel_final"] for g in rows]))
        assert s["accuracy_sft_score"] == pytest.approx(np.mean([g["accuracy_sft"] for g in rows]))
    assert "accuracy" in format_table(results) and "vowel" in format_table(results)


def test_eval_without_a_reward_model_or_text_rewards_says_what_to_set(tmp_path):
    from rlhfkit.errors import ConfigError

    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_like(30))
    cfg = config(tmp_path, data, eval={"policy": "tiny-random", "baseline": "tiny-random"})
    with pytest.raises(ConfigError, match="eval.rewards"):
        run_eval(cfg, show_progress=False)

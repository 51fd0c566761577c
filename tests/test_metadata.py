"""Prompt records' metadata (the fields a format does not read) from the data files through phase 3: the
rows `stage_data(cfg, 3, ...)` gives the RL trainer carry it as row(i)["metadata"], in train and eval, through
the cache. The eval side (prompt files, eval.rewards) is in tests/test_eval.py."""

import json
from pathlib import Path

from conftest import needs_shared, write_jsonl
from rlhfkit.config import Config
from rlhfkit.data.prepare import CACHE_FORMAT, read_manifest
from rlhfkit.data.table import TokenTable
from rlhfkit.train.common import stage_data


def gsm8k_like(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "response": f"{i} + {i} = {2 * i}\n#### {2 * i}",
             "final_answer": str(2 * i), "level": i % 3} for i in range(n)]


def config(tmp_path: Path, data_file: Path, dataset: dict | None = None) -> Config:
    ds = {"name": "d", "path": str(data_file), "format": "sft", "phases": [3]} if dataset is None else dataset
    return Config.model_validate({
        "run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "tiny-random"},
        "data": {"datasets": [ds], "cache_dir": str(tmp_path / "cache"), "max_seq_len": 96, "max_prompt_len": 48,
                 "eval_fraction": 0.2}})


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
    seen = []
    for attempt in range(2):  # built, then read back from the cache (another run dir, the same cache)
        cfg = config(tmp_path, data)
        cfg.run.output_dir = str(tmp_path / f"run{attempt}")
        train, evals, _ = stage_data(cfg, 3, False)
        manifest = read_manifest(cfg.output_dir / "data")
        assert (manifest["cache_hits"], manifest["cache_misses"]) == ((2, 0) if attempt else (0, 2))
        assert len(train) + len(evals) == 40 and len(evals) > 0
        rows = []
        for table in (train, evals):
            for i in range(len(table)):
                meta = table.row(i)["metadata"]
                assert set(meta) == {"id", "final_answer", "level"}  # prompt and response are not metadata
                assert meta == {k: by_id[meta["id"]][k] for k in ("id", "final_answer", "level")}
                rows.append(meta["id"])
        seen.append(rows)
    assert seen[0] == seen[1] and len(set(seen[0])) == 40


def test_the_cache_key_names_the_format_that_carries_metadata(tmp_path):
    """Entries of earlier formats (phase 3 without metadata) are never read: the format is in the key."""
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_like(20))
    cfg = config(tmp_path, data)
    stage_data(cfg, 3, False)
    entry = read_manifest(cfg.output_dir / "data")["phases"]["3"]["train"][0]["cache_key"]
    assert CACHE_FORMAT >= 3 and (Path(cfg.data.cache_dir) / entry / "checksums.json").is_file()


def test_a_record_without_other_fields_has_empty_metadata(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {i}."} for i in range(20)])
    train, evals, _ = stage_data(config(tmp_path, data, {"name": "p", "path": str(data)}), 3, False)
    assert len(train) and len(evals)
    assert all(t.row(i)["metadata"] == {} for t in (train, evals) for i in range(len(t)))


def test_an_sft_dataset_feeds_phase3_when_its_phases_say_so(tmp_path):
    """The format is detected (sft); with phases [1, 3] the records are cut between SFT and the RL prompts,
    whose rows carry the prompt alone and the metadata. Without `phases`, an SFT dataset gives no RL prompts."""
    records = gsm8k_like(60)
    data = write_jsonl(tmp_path / "gsm.jsonl", records)
    cfg = config(tmp_path, data, {"name": "g", "path": str(data), "phases": [1, 3]})
    sft, _, _ = stage_data(cfg, 1, False)
    train, evals, _ = stage_data(cfg, 3, False)
    assert read_manifest(cfg.output_dir / "data")["datasets"][0] == {"name": "g", "format": "sft", "phases": [1, 3]}
    assert len(sft) + len(train) + len(evals) > 45 and len(train) and len(evals)
    ids = {train.row(i)["metadata"]["id"] for i in range(len(train))}
    assert all(train.row(i)["metadata"]["final_answer"] == str(2 * int(train.row(i)["metadata"]["id"][1:]))
               for i in range(len(train)))
    stats = json.loads((cfg.output_dir / "data" / "phase3" / "train" / "g.stats.json").read_text())
    assert "####" not in "".join(e["prompt"] for e in stats["examples"])  # the prompt alone, no response
    assert len(ids) == len(train)
    plain = config(tmp_path / "plain", data, {"name": "g", "path": str(data)})
    assert len(stage_data(plain, 1, False)[0]) > 0
    assert read_manifest(plain.output_dir / "data")["phases"]["3"] == {"train": [], "eval": []}


def test_real_gsm8k_prompts_carry_their_final_answer(tmp_path):
    path = needs_shared("data/sft/gsm8k_train.jsonl.gz")
    cfg = config(tmp_path, path)
    cfg.data.datasets[0].max_records = 50
    train, evals, _ = stage_data(cfg, 3, False)
    metas = [t.row(i)["metadata"] for t in (train, evals) for i in range(len(t))]
    assert len(metas) >= 45 and all(set(m) == {"id", "final_answer"} for m in metas)
    assert all(m["final_answer"].replace(",", "").lstrip("-").replace(".", "").isdigit() for m in metas)

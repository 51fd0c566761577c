"""Every bad file in tests/data/bad gets a clear error naming file (and line), or a counted, reported skip."""

import json

import pytest

from conftest import BAD, make_config
from rlhfkit.data.prepare import prepare
from rlhfkit.errors import DataError


def run(tmp_path, tokenizer, filename, **data):
    cfg = make_config(tmp_path, [{"name": "bad", "path": str(BAD / filename), "format": "preference"}], **data)
    manifest = prepare(cfg, tokenizer=tokenizer, show_progress=False)
    return cfg, manifest


def stats_of(cfg, manifest, phase, split="train"):
    entry = manifest["phases"][str(phase)][split][0]
    return json.loads((cfg.output_dir / "data" / entry["file"]).with_suffix(".stats.json").read_text())


def total_kept(manifest, phase):
    return sum(e["records"] for s in ("train", "eval") for e in manifest["phases"][str(phase)][s])


@pytest.mark.parametrize(
    "filename, reason, words",
    [
        ("malformed_json.jsonl", "invalid_json", "invalid JSON"),
        ("missing_field.jsonl", "missing_field", "missing field 'rejected'"),
        ("empty_response.jsonl", "empty_response", "field 'chosen' is empty"),
        ("whitespace_response.jsonl", "empty_response", "field 'rejected' is empty or whitespace only"),
        ("non_utf8.jsonl", "invalid_utf8", "invalid UTF-8"),
    ],
)
def test_bad_record_is_skipped_counted_and_located(tmp_path, tiny_tokenizer, filename, reason, words):
    cfg, manifest = run(tmp_path, tiny_tokenizer, filename)
    load = stats_of(cfg, manifest, 1)["load"]
    assert load["read"] == 9 and load["valid"] == 8
    assert load["skipped"] == {reason: 1}
    (example,) = load["skipped_examples"]
    assert example["where"] == f"{BAD / filename}:4"  # the bad record is on line 4
    assert words in example["detail"]
    assert total_kept(manifest, 1) + total_kept(manifest, 2) + total_kept(manifest, 3) == 8  # nothing else lost


@pytest.mark.parametrize("filename", ["malformed_json.jsonl", "missing_field.jsonl", "non_utf8.jsonl"])
def test_strict_mode_stops_naming_file_and_line(tmp_path, tiny_tokenizer, filename):
    with pytest.raises(DataError) as err:
        run(tmp_path, tiny_tokenizer, filename, on_bad_record="error")
    assert f"{BAD / filename}:4" in str(err.value)


def test_chosen_equals_rejected_is_dropped_from_pairs_only(tmp_path, tiny_tokenizer):
    cfg, manifest = run(tmp_path, tiny_tokenizer, "chosen_equals_rejected.jsonl", phase_ratios=[0, 1, 0])
    stats = [stats_of(cfg, manifest, 2, split) for split in ("train", "eval")]
    assert sum(s["dropped"].get("chosen_equals_rejected", 0) for s in stats) == 1
    (ex,) = [x for s in stats for x in s["dropped_examples"]]
    assert ex["where"].endswith("chosen_equals_rejected.jsonl:4")
    assert total_kept(manifest, 2) == 8


@pytest.mark.parametrize("policy, counted", [("truncate", "truncated"), ("drop", "dropped")])
def test_one_megabyte_record_is_truncated_or_dropped_and_counted(tmp_path, tiny_tokenizer, policy, counted):
    cfg, manifest = run(tmp_path, tiny_tokenizer, "one_mb_record.jsonl.gz", overlong=policy, phase_ratios=[1, 0, 0])
    stats = [stats_of(cfg, manifest, 1, s) for s in ("train", "eval")]
    if policy == "truncate":
        assert sum(s["truncated"].get("response", 0) for s in stats) == 1
        assert total_kept(manifest, 1) == 9
        for s in stats:
            assert s["token_lengths"]["input_ids"]["max"] <= cfg.data.max_seq_len
    else:
        assert sum(s["dropped"].get("too_long", 0) for s in stats) == 1
        assert total_kept(manifest, 1) == 8


def test_empty_file_is_an_error_naming_it(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no records"):
        run(tmp_path, tiny_tokenizer, "empty.jsonl")


def test_missing_file_is_an_error_naming_it(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"data file not found: .*no_such_file\.jsonl"):
        run(tmp_path, tiny_tokenizer, "no_such_file.jsonl")


def test_missing_eval_file_is_an_error_naming_it(tmp_path, tiny_tokenizer, prefs_file):
    cfg = make_config(tmp_path, [{"name": "x", "path": str(prefs_file), "eval_path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(DataError, match=r"eval_path: data file not found: .*nope\.jsonl"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path, tiny_tokenizer):
    data = (BAD / "one_mb_record.jsonl.gz").read_bytes()
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(data[: len(data) // 2])
    cfg = make_config(tmp_path, [{"name": "x", "path": str(broken), "format": "preference"}])
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read the file"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


def test_cli_prints_the_error_without_traceback(tmp_path, capsys):
    from rlhfkit.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: tiny-random}}\n"
                   f"data: {{cache_dir: {tmp_path}/cache, datasets: [{{name: e, path: {BAD / 'empty.jsonl'}}}]}}\n"
                   f"run: {{output_dir: {tmp_path}/run}}\n")
    assert main(["data", "prepare", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "empty.jsonl" in err and "Traceback" not in err

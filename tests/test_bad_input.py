"""Every bad file in tests/data/bad gets a clear error naming file (and line), or a counted, reported skip."""

import json
import re
from pathlib import Path

import pytest

from conftest import BAD, make_config, pref_records, write_jsonl
from rlhfkit.data.prepare import load_phase, prepare, skip_summary
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
        ("unknown_role.jsonl", "unknown_role", "prompt[0] has the role 'narrator'"),
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


@pytest.mark.parametrize("filename", ["malformed_json.jsonl", "missing_field.jsonl", "non_utf8.jsonl", "unknown_role.jsonl"])
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


def cli_data_prepare(tmp_path: Path, data_file: Path, output_dir: Path) -> int:
    """`rlhfkit data prepare` in process on a tiny-random config of one dataset; its exit code."""
    from rlhfkit.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: tiny-random}}\n"
                   f"data: {{cache_dir: {tmp_path}/cache, datasets: [{{name: d, path: {data_file}}}]}}\n"
                   f"run: {{output_dir: {output_dir}}}\n")
    return main(["data", "prepare", str(cfg), "--no-progress"])


def test_cli_prints_the_error_without_traceback(tmp_path, capsys):
    assert cli_data_prepare(tmp_path, BAD / "empty.jsonl", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "empty.jsonl" in err and "Traceback" not in err


@pytest.mark.parametrize("filename", ["bom.jsonl", "bom.jsonl.gz", "bom.json"])
def test_byte_order_mark_is_not_part_of_the_first_record(tmp_path, tiny_tokenizer, filename):
    cfg, manifest = run(tmp_path, tiny_tokenizer, filename)
    load = stats_of(cfg, manifest, 1)["load"]
    assert (load["read"], load["valid"], load["skipped"]) == (9, 9, {})
    assert sum(total_kept(manifest, p) for p in (1, 2, 3)) == 9


def test_a_directory_as_data_file_says_so_and_what_is_expected(tmp_path, tiny_tokenizer, prefs_file):
    with pytest.raises(DataError) as err:
        run(tmp_path, tiny_tokenizer, "")  # BAD itself
    message = str(err.value)
    assert f"dataset 'bad': path: {BAD} is a directory; expected one data file (.jsonl, .jsonl.gz" in message
    assert "bom.json" in message  # what it holds, to pick from
    cfg = make_config(tmp_path, [{"name": "x", "path": str(prefs_file), "eval_path": str(tmp_path)}])
    with pytest.raises(DataError, match=r"dataset 'x': eval_path: .* is a directory"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


# ---- a phase without training rows ----

def test_phase_given_nothing_by_its_ratio_says_so_when_loaded(tmp_path, tiny_tokenizer):
    cfg, _ = run(tmp_path, tiny_tokenizer, "malformed_json.jsonl", phase_ratios=[0, 1, 1])
    with pytest.raises(DataError) as err:
        load_phase(cfg.output_dir / "data", 1, "train")
    assert str(err.value) == (
        "phase 1 (sft) has no training rows: dataset 'bad': none of its 8 valid training records went to phase 1 "
        "(phase_ratios [0.0, 1.0, 1.0], whole prompts per phase) (reading it skipped 1 of 9 records: "
        "1 invalid JSON (first: malformed_json.jsonl line 4)). `rlhfkit data inspect CONFIG` shows more")
    assert len(load_phase(cfg.output_dir / "data", 1, "eval")) == 1  # an empty eval split is no error


def special_token_prompts(tmp_path, n=12):
    records = [{"prompt": f"Question {i} <|im_end|>", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]
    return write_jsonl(tmp_path / "special.jsonl", records)


def test_phase_whose_records_were_all_dropped_says_why(tmp_path, tiny_tokenizer):
    # which records phase 2 gets follows the split seed (data.seed, default run.seed 42): line 4 is its first
    path = special_token_prompts(tmp_path)
    cfg = make_config(tmp_path, [{"name": "sp", "path": str(path)}])
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    with pytest.raises(DataError) as err:
        load_phase(cfg.output_dir / "data", 2, "train")
    assert str(err.value) == ("phase 2 (reward) has no training rows: dataset 'sp': all 5 records it gave phase 2 "
                              "were dropped: 5 special token in text (first: special.jsonl line 4). "
                              "`rlhfkit data inspect CONFIG` shows more")


def test_phase_no_dataset_feeds_names_the_datasets(tmp_path, tiny_tokenizer):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i}", "response": f"{i}!"} for i in range(10)])
    cfg = make_config(tmp_path, [{"name": "s", "path": str(sft)}])
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    with pytest.raises(DataError, match=r"phase 2 \(reward\) has no training rows: no dataset feeds it "
                                        r"\('s' \(sft\) feeds phases \[1\]\)"):
        load_phase(cfg.output_dir / "data", 2, "train")


def test_sft_on_a_phase_without_rows_is_an_error_not_a_traceback(tmp_path, capsys):
    from rlhfkit.cli import main

    path = special_token_prompts(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: tiny-random}}\n"
                   f"data: {{cache_dir: {tmp_path}/cache, max_seq_len: 128, max_prompt_len: 64, "
                   f"datasets: [{{name: sp, path: {path}}}]}}\n"
                   f"sft: {{micro_batch_size: 2, max_steps: 2}}\n"
                   f"run: {{output_dir: {tmp_path}/run}}\n")
    assert main(["sft", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "phase 1 (sft) has no training rows: dataset 'sp'" in err and "Traceback" not in err


# ---- one summary of every skip ----

def mixed_bad_config(tmp_path, output="run"):
    datasets = [{"name": n, "path": str(BAD / f), "format": "preference"} for n, f in
                [("a", "malformed_json.jsonl"), ("b", "unknown_role.jsonl"), ("c", "chosen_equals_rejected.jsonl")]]
    cfg = make_config(tmp_path, datasets, phase_ratios=[0, 1, 0])  # every pair in phase 2, where c's is dropped
    cfg.run.output_dir = str(tmp_path / output)
    return cfg


MIXED_SUMMARY = ("data: skipped 3 of 27 records: 1 chosen equals rejected (first: chosen_equals_rejected.jsonl line 4), "
                 "1 invalid JSON (first: malformed_json.jsonl line 4), 1 unknown role (first: unknown_role.jsonl line 4)")


def test_skips_are_summed_up_once_on_the_console(tmp_path, tiny_tokenizer, capsys):
    cfg = mixed_bad_config(tmp_path)
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)  # as every later stage does
    assert capsys.readouterr().out.splitlines() == [MIXED_SUMMARY]
    assert skip_summary(cfg.output_dir / "data") == MIXED_SUMMARY


def test_skip_summary_on_a_cache_hit_counts_from_the_cache(tmp_path, tiny_tokenizer, capsys):
    prepare(mixed_bad_config(tmp_path), tokenizer=tiny_tokenizer, show_progress=False)
    capsys.readouterr()
    manifest = prepare(mixed_bad_config(tmp_path, output="run2"), tokenizer=tiny_tokenizer, show_progress=False)
    assert manifest["cache_misses"] == 0
    assert capsys.readouterr().out.splitlines() == [MIXED_SUMMARY]


def test_nothing_skipped_prints_nothing(tmp_path, tiny_tokenizer, prefs_file, capsys):
    cfg = make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}])
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert capsys.readouterr().out == "" and skip_summary(cfg.output_dir / "data") == ""


# ---- a damaged data cache ----

def cache_entry(tmp_path, manifest, phase, split):
    return tmp_path / "cache" / manifest["phases"][str(phase)][split][0]["cache_key"]


def first_rows(cfg):
    return [t.row(0)["chosen_ids"].tolist() for _, t in load_phase(cfg.output_dir / "data", 2, "train")]


@pytest.mark.parametrize("damage, says", [
    ("truncate table", r"table\.npz has \d+ bytes, \d+ were written"),
    ("garble stats", r"stats\.json does not match its SHA-256"),
    ("remove checksums", r"checksums\.json is missing or unreadable"),
])
def test_damaged_cache_entry_is_rebuilt_saying_so(tmp_path, tiny_tokenizer, capsys, damage, says):
    path = write_jsonl(tmp_path / "prefs.jsonl", pref_records(50))
    cfg = make_config(tmp_path, [{"name": "p", "path": str(path)}])
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    before = first_rows(cfg)
    entry = cache_entry(tmp_path, manifest, 2, "train")
    if damage == "truncate table":
        data = (entry / "table.npz").read_bytes()
        with open(entry / "table.npz", "r+b") as f:
            f.truncate(len(data) // 2)
    elif damage == "garble stats":
        text = (entry / "stats.json").read_bytes()
        with open(entry / "stats.json", "r+b") as f:
            f.write(b"#" * len(text))
    else:
        (entry / "checksums.json").unlink()
    capsys.readouterr()
    again = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert (again["cache_hits"], again["cache_misses"]) == (5, 1)
    err = capsys.readouterr().err
    assert f"data: cache entry {entry} ('p', phase 2 train) is damaged: " in err and "rebuilding it" in err
    assert re.search(says, err)
    assert first_rows(cfg) == before


def test_damaged_prepared_table_is_an_error_naming_it(tmp_path, tiny_tokenizer, prefs_file):
    cfg = make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}])
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    table = cfg.output_dir / "data" / "phase2" / "train" / "p.npz"
    table.unlink()  # not the cache's copy: the run dir's link
    table.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=r"p\.npz cannot be read .*run `rlhfkit data prepare CONFIG` again"):
        load_phase(cfg.output_dir / "data", 2, "train")


# ---- issue 19: wrong columns, an output dir that is a file ----

def test_a_preference_file_with_other_columns_names_the_file_and_the_fields(tmp_path, tiny_tokenizer):
    """It said only "dataset 'x' (train): no valid records", naming neither the file nor the fields."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "good": "yes", "bad": "no"} for i in range(6)])
    cfg = make_config(tmp_path, [{"name": "x", "path": str(path), "format": "preference"}])
    with pytest.raises(DataError) as err:
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    message = str(err.value)
    assert f"dataset 'x' (train): no valid records in {path}" in message
    assert "a preference record needs the fields ['prompt', 'chosen', 'rejected']" in message
    assert "its first records have ['bad', 'good', 'question']" in message


@pytest.mark.parametrize("where", ["run", "run/inside"])
def test_data_prepare_with_an_output_dir_that_is_a_file_is_an_error_naming_it(tmp_path, prefs_file, capsys, where):
    """`rlhfkit data prepare` ended in a NotADirectoryError traceback (the training stages said it)."""
    (tmp_path / "run").write_text("not a dir")
    assert cli_data_prepare(tmp_path, prefs_file, tmp_path / where) == 2
    err = capsys.readouterr().err
    assert f"run.output_dir {tmp_path / where}: {tmp_path / 'run'} is a file, not a directory" in err, err
    assert "Traceback" not in err

"""Data as users have it: TRL's dataset formats, a field mapping per dataset, parquet / arrow / feather / csv
files, `datasets` save_to_disk directories and hub ids (offline, from the `datasets` cache), and a TRL-format
preference file and conversational SFT file through data prepare and a step of SFT and of the RM."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.feather
import pyarrow.parquet as pq
import pytest

from conftest import REPO, make_config, write_jsonl
from rlhfkit.config import load_config
from rlhfkit.data.prepare import load_phase, prepare
from rlhfkit.data.records import BadRecord, detect_format, map_fields, to_example
from rlhfkit.data.render import Renderer
from rlhfkit.errors import ConfigError, DataError


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def trl_preferences(n: int):
    """TRL's conversational preference format with an implicit prompt; every other one has three prompt turns."""
    out = []
    for i in range(n):
        shared = [user(f"Please tell me fact number {i}.")]
        if i % 2:
            shared += [bot("Which kind of fact?"), user(f"Any kind, number {i}.")]
        out.append({"chosen": shared + [bot(f"Thank you for asking! Fact {i} is that water boils at 100 degrees.")],
                    "rejected": shared + [bot("No.")]})
    return out


def trl_conversations(n: int):
    """TRL's conversational SFT format: one `messages` list whose last turn is the reply to learn."""
    return [{"messages": [{"role": "system", "content": "Be brief."}, user(f"Say {i}."), bot(f"{i}!"),
                          user(f"And {i} again?"), bot(f"{i} again!")]} for i in range(n)]


# ---- TRL's formats, record by record ----

def test_conversational_sft_keeps_the_turns_and_learns_the_last_reply():
    raw = trl_conversations(1)[0]
    assert detect_format(raw) == "sft"
    ex = to_example(raw, "sft", "f:1", 0)
    assert ex.prompt == raw["messages"][:-1] and ex.chosen == "0 again!" and ex.metadata == {}


def test_prompt_completion_as_strings_or_messages():
    plain = {"prompt": "What is 2+2?", "completion": " 4"}
    assert detect_format(plain) == "sft"
    assert to_example(plain, "sft", "f:1", 0).chosen == "4"
    conv = {"prompt": [user("What is 2+2?")], "completion": [bot("4")]}
    ex = to_example(conv, "sft", "f:1", 0)
    assert (ex.prompt, ex.chosen) == ([user("What is 2+2?")], "4")


def test_preference_with_an_explicit_prompt_and_message_replies():
    for prompt in ("Hi", [user("Hi")]):
        ex = to_example({"prompt": prompt, "chosen": [bot("Hello")], "rejected": [bot("Go")]}, "preference", "f:1", 0)
        assert (ex.prompt, ex.chosen, ex.rejected) == ([user("Hi")], "Hello", "Go")


def test_implicit_prompt_is_the_shared_leading_turns():
    raw = trl_preferences(2)[1]
    assert detect_format(raw) == "preference"
    ex = to_example(raw, "preference", "f:1", 0)
    assert ex.prompt == [user("Please tell me fact number 1."), bot("Which kind of fact?"), user("Any kind, number 1.")]
    assert ex.chosen.startswith("Thank you") and ex.rejected == "No."


def test_a_prompt_beside_whole_conversations_is_not_read_as_in_trl():
    """UltraFeedback's layout: `prompt` repeats the first user turn of the chosen and rejected conversations."""
    raw = {"prompt": "Hi", "chosen": [user("Hi"), bot("Hello")], "rejected": [user("Hi"), bot("Go")]}
    ex = to_example(raw, "preference", "f:1", 0)
    assert (ex.prompt, ex.chosen, ex.rejected) == ([user("Hi")], "Hello", "Go")


def test_prompt_only_messages_leave_out_a_trailing_reply():
    assert to_example({"messages": [user("Hi"), bot("Hello")]}, "prompt", "f:1", 0).prompt == [user("Hi")]
    assert to_example({"prompt": [user("Hi")]}, "prompt", "f:1", 0).prompt == [user("Hi")]


@pytest.mark.parametrize("raw, fmt, reason, detail", [
    ({"messages": [user("Hi")]}, "sft", "bad_transcript", "'messages' must end with an assistant turn"),
    ({"messages": "Hi"}, "sft", "wrong_type", "field 'messages' must be a list"),
    ({"messages": [user("Hi"), {"role": "assistant"}]}, "sft", "wrong_type", r"messages\[1\] must be"),
    ({"prompt": "Hi", "completion": [bot("a"), user("b"), bot("c")]}, "sft", "bad_response",
     "field 'completion' must hold one assistant message"),
    ({"messages": [user("Hi"), bot(" ")]}, "sft", "empty_response", r"field 'messages\[1\]' is empty"),
    ({"prompt": "Hi", "chosen": [user("Hello")], "rejected": [bot("Go")]}, "preference", "bad_response",
     r"got the roles \['user'\]"),
    ({"chosen": [user("Hi"), bot("a"), user("b"), bot("c")], "rejected": [user("Hi"), bot("x"), user("y"), bot("z")]},
     "preference", "bad_response", "share 1 leading turns; after them each must be one assistant reply"),
    ({"chosen": [user("Hi"), bot("a")], "rejected": [user("Ho"), bot("b")]}, "preference", "bad_transcript",
     "share no leading turn"),
    ({"chosen": [user("Hi"), bot("a")], "rejected": "\n\nHuman: Hi\n\nAssistant: b"}, "preference", "wrong_type",
     "field 'chosen' must be a string"),
])
def test_malformed_trl_records_say_why_and_where(raw, fmt, reason, detail):
    with pytest.raises(BadRecord, match=detail) as err:
        to_example(raw, fmt, "data.jsonl:7", 0)
    assert err.value.reason == reason and "data.jsonl:7" in str(err.value)


# ---- the field mapping ----

def test_map_fields_renames_and_names_a_missing_field():
    raw = {"question": "Q", "better": "A", "worse": "B", "prompt": "unused", "id": 3}
    fields = {"prompt": "question", "chosen": "better", "rejected": "worse"}
    assert map_fields(raw, fields, "f:1") == {"prompt": "Q", "chosen": "A", "rejected": "B", "id": 3}
    with pytest.raises(BadRecord, match=r"f:2: no field 'worse', which `fields:` maps to 'rejected'") as err:
        map_fields({"question": "Q", "better": "A"}, fields, "f:2")
    assert err.value.reason == "missing_field"


def mapped_records(n):
    return [{"id": i, "question": f"What is fact {i}?", "better": f"Fact {i} is true.", "worse": f"No idea {i}."}
            for i in range(n)]


FIELDS = {"prompt": "question", "chosen": "better", "rejected": "worse"}


def test_a_field_mapping_reads_other_names_and_is_part_of_the_cache_key(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", mapped_records(40))
    cfg = make_config(tmp_path, [{"name": "qa", "path": str(path), "fields": FIELDS}])
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert manifest["datasets"][0]["format"] == "preference"  # detected after the mapping
    assert sum(e["records"] for p in "123" for s in ("train", "eval") for e in manifest["phases"][p][s]) == 40
    table = load_phase(cfg.output_dir / "data", 2, "train")[0][1]
    row = table.row(0)
    assert tiny_tokenizer.decode(row["chosen_ids"][row["prompt_len"]:]).startswith("Fact ")
    swapped = make_config(tmp_path, [{"name": "qa", "path": str(path),
                                      "fields": {**FIELDS, "chosen": "worse", "rejected": "better"}}])
    again = prepare(swapped, tokenizer=tiny_tokenizer, show_progress=False)
    assert again["cache_misses"] == 6
    row = load_phase(swapped.output_dir / "data", 2, "train")[0][1].row(0)
    assert tiny_tokenizer.decode(row["chosen_ids"][row["prompt_len"]:]).startswith("No idea")


def test_a_mapped_field_missing_from_the_first_record_names_file_line_and_field(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", mapped_records(10))
    cfg = make_config(tmp_path, [{"name": "qa", "path": str(path), "fields": {**FIELDS, "prompt": "questoin"}}])
    with pytest.raises(DataError, match=rf"dataset 'qa', {path}:1: no field 'questoin', which `fields:` maps to "
                                        rf"'prompt' \(the record has \['better', 'id', 'question', 'worse'\]\)"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


def test_a_mapped_field_missing_later_is_a_counted_bad_record_or_an_error(tmp_path, tiny_tokenizer):
    records = mapped_records(30)
    del records[4]["worse"]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    cfg = make_config(tmp_path, [{"name": "qa", "path": str(path), "fields": FIELDS}])
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    stats = json.loads((cfg.output_dir / "data" / manifest["phases"]["1"]["train"][0]["file"])
                       .with_suffix(".stats.json").read_text())
    assert stats["load"]["skipped"] == {"missing_field": 1}
    assert stats["load"]["skipped_examples"][0]["where"] == f"{path}:5"
    strict = make_config(tmp_path, [{"name": "qa", "path": str(path), "fields": FIELDS}], on_bad_record="error",
                         cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(DataError, match=rf"dataset 'qa', {path}:5: no field 'worse', which `fields:` maps to 'rejected'"):
        prepare(strict, tokenizer=tiny_tokenizer, show_progress=False)


@pytest.mark.parametrize("key, value", [("fields", FIELDS), ("eval_path", "eval.jsonl")])
def test_a_registry_dataset_takes_no_fields_or_eval_path(tmp_path, tiny_tokenizer, key, value):
    """It brings its own (data/registry.py): a setting it would not read is an error, not ignored."""
    cfg = make_config(tmp_path, [{"name": "Dahoas/rm-static", key: value}])
    with pytest.raises(DataError, match=rf"a registry dataset brings its own splits and fields .*`{key}:` is for"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


def test_fields_takes_only_rlhfkit_field_names(tmp_path):
    with pytest.raises(Exception, match=r"fields\.answer"):
        make_config(tmp_path, [{"name": "qa", "path": "x.jsonl", "fields": {"answer": "a"}}])


def test_the_config_file_names_a_misspelt_field_mapping(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {datasets: [{name: d, path: d.jsonl, fields: {promt: question}}]}\n")
    with pytest.raises(ConfigError, match="promt"):
        load_config(cfg)


# ---- file types ----

def table_of(records):
    return pa.Table.from_pylist(records)


def write_arrow(path, records, stream: bool):
    table = table_of(records)
    with pa.OSFile(str(path), "wb") as f:
        with (pa.ipc.new_stream if stream else pa.ipc.new_file)(f, table.schema) as w:
            w.write_table(table)
    return path


WRITERS = {
    "parquet": lambda p, r: pq.write_table(table_of(r), p),
    "feather": lambda p, r: pyarrow.feather.write_feather(table_of(r), p),
    "arrow": lambda p, r: write_arrow(p, r, stream=False),
    "arrow-stream": lambda p, r: write_arrow(p, r, stream=True),  # what `datasets` writes
    "saved-dataset": lambda p, r: __import__("datasets").Dataset.from_list(r).save_to_disk(str(p)),
}


def phase_rows(cfg, tokenizer, phase=2):
    """Every prepared (split, prompt, chosen) text of one phase, in order."""
    out = []
    for split in ("train", "eval"):
        for _, table in load_phase(cfg.output_dir / "data", phase, split):
            for i in range(len(table)):
                row = table.row(i)
                out.append((split, tokenizer.decode(row["chosen_ids"][:row["prompt_len"]]),
                            tokenizer.decode(row["chosen_ids"][row["prompt_len"]:])))
    return out


@pytest.mark.parametrize("kind", list(WRITERS))
def test_each_file_type_gives_the_same_tables_as_jsonl(tmp_path, tiny_tokenizer, kind):
    records = trl_preferences(30)
    reference = make_config(tmp_path / "jsonl", [{"name": "d", "path": str(write_jsonl(tmp_path / "d.jsonl", records))}])
    prepare(reference, tokenizer=tiny_tokenizer, show_progress=False)
    path = tmp_path / ("d." + kind.split("-")[0] if kind != "saved-dataset" else "saved")
    WRITERS[kind](path, records)
    cfg = make_config(tmp_path / kind, [{"name": "d", "path": str(path)}])
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert manifest["datasets"][0]["format"] == "preference"
    assert phase_rows(cfg, tiny_tokenizer) == phase_rows(reference, tiny_tokenizer)
    assert len(phase_rows(cfg, tiny_tokenizer)) > 5


def test_csv_with_a_field_mapping_multi_line_fields_and_a_short_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "better", "worse"])
        for i in range(20):
            w.writerow([f"What is fact {i}?\nAnswer briefly.", f"Fact {i} is true.", "No."])
        w.writerow(["a row with one field"])
    cfg = make_config(tmp_path, [{"name": "qa", "path": str(path), "fields": FIELDS}])
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    stats = json.loads((cfg.output_dir / "data" / manifest["phases"]["2"]["train"][0]["file"])
                       .with_suffix(".stats.json").read_text())
    assert (stats["load"]["read"], stats["load"]["valid"], stats["load"]["skipped"]) == (21, 20, {"invalid_csv": 1})
    # 1 header line, 20 records of two lines each: the short row starts on line 42
    assert stats["load"]["skipped_examples"][0] == {"reason": "invalid_csv", "where": f"{path}:42",
                                                    "detail": "the line has 1 fields, the header 3"}
    assert any("Answer briefly." in prompt for _, prompt, _ in phase_rows(cfg, tiny_tokenizer))


def test_a_broken_arrow_file_is_a_data_error_naming_it(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.arrow"
    path.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"bad\.arrow: cannot read it as Arrow"):
        prepare(make_config(tmp_path, [{"name": "b", "path": str(path)}]), tokenizer=tiny_tokenizer, show_progress=False)


def save_dataset_dict(path, records, eval_split="test", eval_n=10):
    import datasets

    ds = datasets.Dataset.from_list(records)
    datasets.DatasetDict({"train": ds.select(range(len(records) - eval_n)),
                          eval_split: ds.select(range(len(records) - eval_n, len(records)))}).save_to_disk(str(path))
    return path


def eval_records(manifest):
    return sum(e["records"] for p in "123" for e in manifest["phases"][p]["eval"])


@pytest.mark.parametrize("eval_split", ["test", "validation"])
def test_a_saved_dataset_dict_gives_its_train_split_and_its_eval_split(tmp_path, tiny_tokenizer, eval_split):
    path = save_dataset_dict(tmp_path / "dd", trl_preferences(40), eval_split)
    cfg = make_config(tmp_path, [{"name": "dd", "path": str(path)}], eval_fraction=0.5)
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert eval_records(manifest) == 10  # the saved eval split, not half of train carved out
    eval_prompts = {prompt for split, prompt, _ in phase_rows(cfg, tiny_tokenizer) if split == "eval"}
    assert eval_prompts and all(any(f"number {i}" in p for i in range(30, 40)) for p in eval_prompts)
    load = json.loads((cfg.output_dir / "data" / manifest["phases"]["2"]["eval"][0]["file"])
                      .with_suffix(".stats.json").read_text())["load"]
    assert load["read"] == 10


def test_a_saved_dataset_as_eval_path_is_all_eval(tmp_path, tiny_tokenizer):
    import datasets

    records = trl_preferences(40)
    datasets.Dataset.from_list(records[30:]).save_to_disk(str(tmp_path / "eval"))
    train = write_jsonl(tmp_path / "train.jsonl", records[:30])
    manifest = prepare(make_config(tmp_path, [{"name": "d", "path": str(train), "eval_path": str(tmp_path / "eval")}]),
                       tokenizer=tiny_tokenizer, show_progress=False)
    assert eval_records(manifest) == 10


def test_a_saved_dataset_dict_without_the_split_asked_for_names_its_splits(tmp_path, tiny_tokenizer):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(trl_preferences(4))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dataset 'dd' \(.*dd\) has the splits \['test'\], none called 'train'"):
        prepare(make_config(tmp_path, [{"name": "dd", "path": str(tmp_path / "dd")}]), tokenizer=tiny_tokenizer,
                show_progress=False)
    train = write_jsonl(tmp_path / "train.jsonl", trl_preferences(10))
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(trl_preferences(4))}).save_to_disk(str(tmp_path / "ev"))
    cfg = make_config(tmp_path, [{"name": "d", "path": str(train), "eval_path": str(tmp_path / "ev")}])
    with pytest.raises(DataError, match=r"has the splits \['dev'\], none called 'test' or 'validation'"):
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)


def test_a_saved_dataset_saved_again_with_other_records_misses_the_cache(tmp_path, tiny_tokenizer):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(trl_preferences(30)).save_to_disk(str(path))
    cfg = make_config(tmp_path, [{"name": "s", "path": str(path)}])
    prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)["cache_hits"] == 6
    shutil.rmtree(path)
    datasets.Dataset.from_list(trl_preferences(31)).save_to_disk(str(path))
    assert prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)["cache_misses"] == 6


# ---- hub ids ----

def put_in_hub_cache(cache, repo_id, splits: dict, work):
    """What `datasets.load_dataset(repo_id)` leaves in its cache after a load where the hub is reachable: made
    by the same builder (parquet, the hub's own format) from local files, then put where the cache keeps repo_id."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    work.mkdir(parents=True)
    for split, records in splits.items():
        pq.write_table(table_of(records), work / f"{split}.parquet")
    owner, name = repo_id.split("/")
    builder = Parquet(cache_dir=str(work / "build"), dataset_name=name, config_id="default", hash="0" * 40,
                      data_files=DataFilesDict.from_patterns({s: [f"{s}.parquet"] for s in splits}, base_path=str(work)))
    builder.download_and_prepare()
    cache.mkdir(parents=True, exist_ok=True)
    shutil.move(work / "build" / name, cache / f"{owner}___{name}")


def test_a_hub_id_loads_offline_from_the_datasets_cache(tmp_path):
    records = trl_preferences(40)
    cache = tmp_path / "hf-datasets"
    put_in_hub_cache(cache, "someone/trl-prefs", {"train": records[:30], "test": records[30:]}, tmp_path / "work")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: tiny-random}}\n"
                   f"data: {{cache_dir: {tmp_path}/cache, max_seq_len: 128, max_prompt_len: 64, "
                   f"datasets: [{{name: someone/trl-prefs}}]}}\n"
                   f"run: {{output_dir: {tmp_path}/run}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "data", "prepare", str(cfg), "--no-progress"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert eval_records(manifest) == 10  # the hub dataset's test split
    assert sum(e["records"] for p in "123" for e in manifest["phases"][p]["train"]) == 30


def test_a_hub_id_the_hub_cannot_give_says_so_and_how_to_use_a_local_path(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets  # already imported by an earlier test or not: its offline mode must follow the variable now

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    cfg = make_config(tmp_path, [{"name": "someone/not-here"}])
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert time.perf_counter() - started < 10  # no half a minute of retries against an unreachable hub
    message = str(err.value)
    assert "dataset 'someone/not-here' (no `path:` and not a known hub dataset" in message
    assert "unreachable from here" in message and "save_to_disk('DIR')" in message and "`path:`" in message


# ---- through the tiny pipeline ----

def test_trl_preference_and_conversational_sft_files_through_prepare_sft_and_rm(tmp_path, tiny_tokenizer):
    from rlhfkit.train.reward import run_rm
    from rlhfkit.train.sft import run_sft

    prefs = write_jsonl(tmp_path / "trl_prefs.jsonl", trl_preferences(60))
    chats = write_jsonl(tmp_path / "trl_chats.jsonl", trl_conversations(20))
    steps = {"max_steps": 1, "micro_batch_size": 4, "eval_every": 0, "save_every": 0}
    cfg = make_config(tmp_path, [{"name": "prefs", "path": str(prefs)}, {"name": "chats", "path": str(chats)}],
                      eval_fraction=0.2)
    cfg = cfg.model_validate({**cfg.model_dump(mode="json"), "sft": steps, "rm": steps})
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert {d["name"]: d["format"] for d in manifest["datasets"]} == {"prefs": "preference", "chats": "sft"}
    skipped = [json.loads((cfg.output_dir / "data" / e["file"]).with_suffix(".stats.json").read_text())["load"]
               .get("skipped") for p in "123" for e in manifest["phases"][p]["train"]]
    assert skipped and not any(skipped)  # no record skipped (the old reader skipped all as wrong_type)
    assert sum(e["records"] for s in ("train", "eval") for e in manifest["phases"]["1"][s]
               if e["dataset"] == "chats") == 20
    # the turns are kept: the prompt is the chat template's rendering of all the turns before the reply
    renderer = Renderer(tiny_tokenizer, cfg.data)
    chat_rows = load_phase(cfg.output_dir / "data", 1, "train")[1][1]
    row = chat_rows.row(0)
    prompt = tiny_tokenizer.decode(row["input_ids"][:row["prompt_len"]])
    n = int(prompt.split("And ")[1].split(" again?")[0])
    assert prompt == renderer.prompt_text(trl_conversations(n + 1)[n]["messages"][:-1])
    assert tiny_tokenizer.decode(row["input_ids"][row["prompt_len"]:]) == f"{n} again!{tiny_tokenizer.eos_token}"
    pair_prompts = [p for _, p, _ in phase_rows(cfg, tiny_tokenizer)]
    assert any("Which kind of fact?" in p for p in pair_prompts)
    sft = run_sft(cfg, show_progress=False)
    rm = run_rm(cfg, show_progress=False)
    for stage, result in (("sft", sft), ("rm", rm)):
        assert (cfg.output_dir / stage / "final" / "model.safetensors").is_file()
        metrics = [json.loads(x) for x in (cfg.output_dir / stage / "metrics.jsonl").read_text().splitlines()]
        losses = [m["train/loss"] for m in metrics if "train/loss" in m]
        assert len(losses) == 1 and losses[0] > 0, (stage, result)


def test_every_example_in_docs_data_md_is_read_as_its_sections_format():
    text = (REPO / "docs" / "data.md").read_text()
    formats = {"Preference": "preference", "SFT": "sft", "Prompt": "prompt"}
    checked = 0
    for section in text.split("\n### ")[1:]:
        fmt = formats.get(section.split()[0])
        if fmt is None:
            assert "```jsonl" not in section, section[:40]
            continue
        for block in section.split("```jsonl\n")[1:]:
            lines = block.split("```")[0].strip().splitlines()
            assert len(lines) == 2, section[:40]
            for line in lines:
                raw = json.loads(line)
                assert detect_format(raw) == fmt, line
                to_example(raw, fmt, "docs/data.md", 0)
                checked += 1
    assert checked == 16  # 8 blocks of two records

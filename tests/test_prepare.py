"""Preparation end to end on a tiny tokenizer: phases, blend, cache hits and misses, concurrency."""

import json
import multiprocessing as mp

import numpy as np
import pytest

from conftest import make_config, pref_records, write_jsonl
from rlhfkit.config import ModelConfig
from rlhfkit.data.prepare import load_phase, prepare
from rlhfkit.models import load_tokenizer


def prompts_of(cfg, tokenizer, phase, split):
    """The set of distinct prompt texts in one phase/split (each test record has a unique prompt)."""
    out = set()
    for _, table in load_phase(cfg.output_dir / "data", phase, split):
        col = table.ragged_columns[0]
        for i in range(len(table)):
            row = table.row(i)
            plen = row.get("prompt_len", len(row[col]))
            out.add(tokenizer.decode(row[col][:plen]))
    return out


def test_phases_and_splits_are_disjoint_and_sized(tmp_path, tiny_tokenizer, prefs_file):
    cfg = make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}], eval_fraction=0.2)
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    counts = {(p, s): sum(e["records"] for e in manifest["phases"][p][s]) for p in "123" for s in ("train", "eval")}
    # 50 records: 10 carved for eval; train 40 → 8/16/16, eval 10 → 2/4/4 (ratios 2,4,4).
    assert counts == {("1", "train"): 8, ("2", "train"): 16, ("3", "train"): 16,
                      ("1", "eval"): 2, ("2", "eval"): 4, ("3", "eval"): 4}
    groups = [prompts_of(cfg, tiny_tokenizer, p, s) for p in (1, 2, 3) for s in ("train", "eval")]
    assert sum(map(len, groups)) == 50
    assert len(set().union(*groups)) == 50  # no record in two places
    assert (cfg.output_dir / "data" / "resolved_config.yaml").is_file()


def test_blend_sft_only_and_prompt_only(tmp_path, tiny_tokenizer, prefs_file):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i}", "response": f"{i}!"} for i in range(20)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl.gz", [{"prompt": f"Tell me about {i}"} for i in range(30)])
    cfg = make_config(tmp_path, [{"name": "p", "path": str(prefs_file)},
                                 {"name": "s", "path": str(sft)},
                                 {"name": "q", "path": str(prompts)}])
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    names = {p: [e["dataset"] for e in manifest["phases"][p]["train"]] for p in "123"}
    assert names == {"1": ["p", "s"], "2": ["p"], "3": ["p", "q"]}
    sft_total = sum(e["records"] for s in ("train", "eval") for e in manifest["phases"]["1"][s] if e["dataset"] == "s")
    assert sft_total == 20  # an SFT-only set gives all its records to phase 1
    formats = {e["dataset"]: e["format"] for e in manifest["phases"]["1"]["train"]}
    assert formats == {"p": "preference", "s": "sft"}  # detected from the fields


def test_second_run_hits_the_cache_with_identical_tables(tmp_path, tiny_tokenizer, prefs_file):
    cfg = make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}])
    first = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert (first["cache_hits"], first["cache_misses"]) == (0, 6)
    before = {n: t.row(0)["chosen_ids"].copy() for n, t in load_phase(cfg.output_dir / "data", 2, "train")}
    second = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    assert (second["cache_hits"], second["cache_misses"]) == (6, 0)
    after = {n: t.row(0)["chosen_ids"] for n, t in load_phase(cfg.output_dir / "data", 2, "train")}
    assert all(np.array_equal(before[n], after[n]) for n in before)
    keys = [e["cache_key"] for p in "123" for s in ("train", "eval") for e in first["phases"][p][s]]
    assert len(set(keys)) == 6  # phase and split are part of the key


@pytest.mark.parametrize(
    "change",
    [
        {"phase_ratios": [1, 1, 1]},
        {"eval_fraction": 0.3},
        {"seed": 99},
        {"max_seq_len": 100},
        {"max_prompt_len": 32},
        {"overlong": "drop"},
        {"template": "plain"},
        {"eos_token": "<s>"},
    ],
)
def test_each_key_component_misses_the_cache(tmp_path, tiny_tokenizer, prefs_file, change):
    prepare(make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}]), tokenizer=tiny_tokenizer, show_progress=False)
    changed = prepare(make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}], **change),
                      tokenizer=tiny_tokenizer, show_progress=False)
    assert changed["cache_misses"] == 6 and changed["cache_hits"] == 0


def test_file_content_and_tokenizer_identity_miss_the_cache(tmp_path, tiny_tokenizer, prefs_file):
    ds = [{"name": "p", "path": str(prefs_file)}]
    prepare(make_config(tmp_path, ds), tokenizer=tiny_tokenizer, show_progress=False)
    other_tok = load_tokenizer(ModelConfig(name_or_path="tiny-random", tiny={"vocab_size": 800}))
    assert prepare(make_config(tmp_path, ds), tokenizer=other_tok, show_progress=False)["cache_misses"] == 6
    write_jsonl(prefs_file, pref_records(50, prefix="changed"))
    assert prepare(make_config(tmp_path, ds), tokenizer=tiny_tokenizer, show_progress=False)["cache_misses"] == 6
    # the same bytes again: a hit (the key is the content, not the file's time stamp)
    write_jsonl(prefs_file, pref_records(50, prefix="changed"))
    assert prepare(make_config(tmp_path, ds), tokenizer=tiny_tokenizer, show_progress=False)["cache_hits"] == 6


def _prepare_in_child(cfg_json, queue):
    from rlhfkit.config import Config

    cfg = Config.model_validate_json(cfg_json)
    manifest = prepare(cfg, show_progress=False)
    queue.put((manifest["cache_hits"], manifest["cache_misses"]))


def test_two_processes_building_the_same_cache(tmp_path, prefs_file):
    cfgs = [make_config(tmp_path, [{"name": "p", "path": str(prefs_file)}]).model_copy(deep=True) for _ in range(2)]
    for i, c in enumerate(cfgs):
        c.run.output_dir = str(tmp_path / f"run{i}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(c.model_dump_json(), queue)) for c in cfgs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = sorted(queue.get() for _ in procs)
    assert sum(m for _, m in results) == 6  # every chunk built exactly once between the two
    entries = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    assert len(entries) == 6 and not [d for d in entries if d.name.startswith(".")]  # no temp dirs left
    a, b = (json.loads((tmp_path / f"run{i}" / "data" / "manifest.json").read_text()) for i in range(2))
    assert a["phases"] == b["phases"]

"""Preparation end to end on a tiny tokenizer: phases, blend, cache hits and misses, concurrency."""

import json
import multiprocessing as mp

import numpy as np
import pytest

from conftest import make_config, needs_shared, pref_records, write_jsonl
from rlhfkit.config import DataConfig, ModelConfig
from rlhfkit.data.prepare import Source, load_phase, prepare, split_dataset
from rlhfkit.data.split import prompt_key
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


def normalised(text):
    return " ".join(text.split()).casefold()


def test_pairs_that_share_a_prompt_stay_on_one_side_of_every_split(tmp_path, tiny_tokenizer):
    # 40 questions with 2 to 7 pairs each; a third of the repeats differ only in spacing and case.
    records = []
    for q in range(40):
        for k in range(2 + q % 6):
            text = f"What   is FACT {q}?" if k % 3 == 2 else f"What is fact {q}?"
            records.append({"prompt": text, "chosen": f"Fact {q} is true ({k}).", "rejected": f"No idea {k}."})
    path = write_jsonl(tmp_path / "many.jsonl", records)
    cfg = make_config(tmp_path, [{"name": "m", "path": str(path)}], eval_fraction=0.2)
    manifest = prepare(cfg, tokenizer=tiny_tokenizer, show_progress=False)
    chunks = {(p, s): {normalised(t) for t in prompts_of(cfg, tiny_tokenizer, p, s)} for p in (1, 2, 3) for s in ("train", "eval")}
    assert sum(map(len, chunks.values())) == len(set().union(*chunks.values())) == 40  # each question in one chunk
    given = {(p, s): json.loads((cfg.output_dir / "data" / e["file"]).with_suffix(".stats.json").read_text())["records_in"]
             for p in (1, 2, 3) for s in ("train", "eval") for e in manifest["phases"][str(p)][s]}
    assert abs(sum(given[(p, "eval")] for p in (1, 2, 3)) - 0.2 * len(records)) <= 3.5  # within half a group
    train = sum(given[(p, "train")] for p in (1, 2, 3))
    for phase, share in ((1, 0.2), (2, 0.4), (3, 0.4)):
        assert abs(given[(phase, "train")] - share * train) <= 3.5 + 3.5 + 1  # two cuts, and rounding


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


def test_fine_grained_rlhf_questions_do_not_leak_from_train_to_eval():
    """FineGrainedRLHF: 2103 pairs from 391 distinct questions. Split per record, 72 of 84 phase-2 eval pairs
    shared their question with phase-2 training pairs, and 75 of 84 phase-3 eval prompts were PPO training
    prompts. Split by prompt, none does, and each chunk stays near its share (210 eval pairs, 2:4:4)."""
    path = needs_shared("data/preference/fgrlhf_qa_feedback_dev.shared.pairs.jsonl.gz")
    cfg = DataConfig(datasets=[{"name": "fgrlhf", "path": str(path), "format": "preference"}])
    chunks, _ = split_dataset(Source(cfg.datasets[0]), cfg)
    keys = {sp: {prompt_key(ex.prompt) for ex in exs} for sp, exs in chunks.items()}
    for a in keys:
        for b in keys:
            assert a == b or not keys[a] & keys[b], f"{a} and {b} share a prompt"
    sizes = {sp: len(exs) for sp, exs in chunks.items()}
    assert sum(sizes.values()) == 2103
    assert abs(sum(n for (s, _), n in sizes.items() if s == "eval") - 210) <= 10
    train = sum(n for (s, _), n in sizes.items() if s == "train")
    for phase, share in ((1, 0.2), (2, 0.4), (3, 0.4)):
        assert abs(sizes[("train", phase)] - share * train) <= 15

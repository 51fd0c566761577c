"""Integration: the quickstart recipe's data on the real hh-rlhf files in ../shared/data."""

import json
from pathlib import Path

import pytest

from conftest import REPO, SHARED, needs_shared
from rlhfkit.config import load_config
from rlhfkit.data.prepare import load_phase, prepare

pytestmark = pytest.mark.slow


def test_quickstart_data_on_real_hh_rlhf(tmp_path, monkeypatch):
    needs_shared("data/preference/hh_helpful_online_test.jsonl.gz")
    needs_shared("data/preference/hh_helpful_base_test.shared.jsonl.gz")
    monkeypatch.setenv("RLHFKIT_SHARED", str(SHARED))
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    manifest = prepare(cfg, show_progress=False)
    data_dir = Path(cfg.output_dir) / "data"

    # Every record read is accounted for: kept in some phase, or dropped / skipped with a reason.
    for ds, n_read in (("hh_helpful", 1919), ("hh_helpful_online", 1137)):
        stats = [json.loads((data_dir / e["file"]).with_suffix(".stats.json").read_text())
                 for p in "123" for s in ("train", "eval") for e in manifest["phases"][p][s] if e["dataset"] == ds]
        load = stats[0]["load"]
        assert load["read"] == n_read
        assert sum(s["records_in"] for s in stats) == load["valid"] == n_read - sum(load["skipped"].values())
        assert all(s["kept"] + sum(s["dropped"].values()) == s["records_in"] for s in stats)

    tok_eos = manifest["tokenizer"]["eos_id"]
    for name, table in load_phase(data_dir, 2, "train"):
        assert len(table) > 300
        for i in range(0, len(table), 97):
            row = table.row(i)
            plen = row["prompt_len"]
            for col in ("chosen_ids", "rejected_ids"):
                resp = row[col][plen:].tolist()
                assert len(row[col]) <= cfg.data.max_seq_len
                # ends with its one EOS, or was cut at the length limit (and then has none)
                assert resp.count(tok_eos) == (1 if resp[-1] == tok_eos else 0)
    again = prepare(cfg, show_progress=False)
    assert again["cache_misses"] == 0

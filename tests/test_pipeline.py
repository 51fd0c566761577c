"""The product on tiny models: one-command pipeline (skip, resume after a kill, --from), eval, export
(HF + GGUF round trip), chat, and the HTML report rendered in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, write_jsonl
from test_training import ENV, kill_when, run_ok, synthetic_pairs

TINY_STAGES = {
    "sft": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-3},
    "rm": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-3},
    "ppo": {"steps": 4, "rollout_batch_size": 4, "eval_every": 2, "eval_prompts": 4, "save_every": 2,
            "sampling": {"max_new_tokens": 8}, "actor": {"micro_batch_size": 4, "learning_rate": 1e-4},
            "critic": {"micro_batch_size": 4, "learning_rate": 1e-4}},
    "eval": {"max_prompts": 6, "batch_size": 4, "sampling": {"max_new_tokens": 8}},
    "export": {"gguf": "f16"},
    "pipeline": {},
}


def pipeline_config(tmp_path: Path, data_file: Path, **changes) -> Path:
    raw = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "tiny-random"},
           "data": {"datasets": [{"name": "d", "path": str(data_file)}], "cache_dir": str(tmp_path / "cache"),
                    "max_seq_len": 96, "max_prompt_len": 48, "eval_fraction": 0.2},
           **json.loads(json.dumps(TINY_STAGES))}
    for section, values in changes.items():
        raw[section].update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One complete tiny pipeline run, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_jsonl(tmp / "pairs.jsonl", synthetic_pairs(80))
    # a budget far above what the tiny stages need: every stage plans all its steps, and records it
    cfg = pipeline_config(tmp, data, pipeline={"time_budget_minutes": 30}, sft={"lr_scheduler": "constant"},
                          rm={"lr_scheduler": "constant"})
    out = run_ok(["pipeline", str(cfg), "--no-progress"])
    return {"config": cfg, "run": tmp / "run", "out": out}


def test_pipeline_runs_every_stage_then_skips_finished_ones(tiny_run):
    run = tiny_run["run"]
    for stage in ("sft", "rm", "ppo"):
        assert (run / stage / "final" / "eval.json").is_file()
    record = json.loads((run / "pipeline.json").read_text())
    assert list(record["seconds"]) == ["data", "sft", "rm", "ppo", "eval", "export"]
    assert {s: p["planned"] for s, p in record["plans"].items()} == {"sft": 4, "rm": 4, "ppo": 4, "eval": 6}
    assert record["replay_overrides"] == ("sft.max_steps=4 rm.max_steps=4 ppo.steps=4 eval.max_prompts=6 "
                                          "pipeline.time_budget_minutes=null")
    assert "time budget" in tiny_run["out"] and "the same run on any machine" in tiny_run["out"]
    # each stage timed its final checkpoint; the next stages guessed theirs from the earlier ones' times
    plans = record["plans"]
    assert all(plans[s]["final_checkpoint_s"] > 0 for s in ("sft", "rm", "ppo"))
    assert plans["sft"]["checkpoint_guess_s"] is None
    assert plans["rm"]["checkpoint_guess_s"] == plans["sft"]["final_checkpoint_s"]
    assert plans["ppo"]["checkpoint_guess_s"] == max(plans[s]["final_checkpoint_s"] for s in ("sft", "rm"))
    # where the time went: every stage's parts add up to its wall time; the training share is printed
    assert list(record["time"]) == list(record["seconds"])
    for stage, t in record["time"].items():
        assert t["wall_s"] == pytest.approx(record["seconds"][stage])
        assert sum(t["seconds"].values()) == pytest.approx(t["wall_s"]), stage
    assert record["time"]["eval"]["seconds"]["eval"] > 0.9 * record["time"]["eval"]["wall_s"]
    for stage in ("sft", "rm", "ppo"):
        assert record["time"][stage]["seconds"]["train_steps"] > 0 and record["time"][stage]["utilisation"] > 0
        assert record["time"][stage]["seconds"]["load"] > 0 and record["time"][stage]["seconds"]["eval"] > 0
    assert "training steps:" in tiny_run["out"] and "GFLOP/s in float32" in tiny_run["out"]
    again = run_ok(["pipeline", str(tiny_run["config"]), "--no-progress"])
    for stage in ("sft", "rm", "ppo", "eval", "export"):
        assert f"pipeline: {stage} is complete, skipped" in again


def test_eval_compares_final_with_sft_and_keeps_every_generation(tiny_run):
    run = tiny_run["run"]
    results = json.loads((run / "eval" / "eval.json").read_text())
    s = results["sets"]["phase3_eval"]
    assert s["prompts"] == 6 and 0.0 <= s["rm_win_rate"] <= 1.0
    for key in ("rm_sft_score", "rm_final_score", "kl_to_sft", "sft_length", "final_length", "sft_eos_rate",
                "final_eos_rate"):
        assert isinstance(s[key], float), key
    assert results["sft_perplexity"] > 1 and 0.0 <= results["rm_accuracy"] <= 1.0
    gens = [json.loads(x) for x in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 6 and all(g["prompt"] and "sft" in g and "final" in g for g in gens)
    # win rate recomputed from the kept generations, ties counted half
    wins = sum((g["rm_final"] > g["rm_sft"]) + 0.5 * (g["rm_final"] == g["rm_sft"]) for g in gens) / len(gens)
    assert s["rm_win_rate"] == pytest.approx(wins)


def test_eval_reads_the_sft_perplexity_and_rm_accuracy_its_stages_measured(tiny_run):
    """They are the same figures on the same rows: eval reads them instead of a second pass, and a fresh
    computation agrees."""
    from rlhfkit.config import load_config
    from rlhfkit.eval.compare import Comparison

    run = tiny_run["run"]
    results = json.loads((run / "eval" / "eval.json").read_text())
    assert results["sft_perplexity"] == json.loads((run / "sft" / "final" / "eval.json").read_text())["eval/perplexity"]
    assert results["rm_accuracy"] == json.loads((run / "rm" / "final" / "eval.json").read_text())["eval/accuracy"]
    cmp = Comparison(load_config(tiny_run["config"]))
    assert cmp.perplexity(cmp.baseline) == pytest.approx(results["sft_perplexity"], rel=1e-4)
    assert cmp.rm_accuracy() == pytest.approx(results["rm_accuracy"])


@pytest.mark.parametrize("qtype,tolerance", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_round_trip_matches_the_hf_logits(tiny_run, tmp_path, qtype, tolerance):
    """Stated tolerance: max |Δlogit| ≤ 2e-3 for f16 and ≤ 3e-2 for q8_0 (tiny model, logits of order 1)."""
    from rlhfkit.export import check_gguf, write_gguf

    hf = tiny_run["run"] / "export" / "hf"
    gguf_file = write_gguf(hf, tmp_path / f"m-{qtype}.gguf", qtype)
    check = check_gguf(hf, gguf_file)
    assert check["max_abs_logit_diff"] <= tolerance, check
    assert check["same_argmax_share"] >= 0.9 and check["logit_scale"] > 0.1


def test_exported_dir_loads_with_plain_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tiny_run["run"] / "export" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.chat_template and (hf / "generation_config.json").is_file()
    ppo_final = tiny_run["run"] / "ppo" / "final"
    ref = AutoModelForCausalLM.from_pretrained(ppo_final)
    ids = tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    export = json.loads((tiny_run["run"] / "export" / "export.json").read_text())
    assert export["round_trip"]["max_abs_logit_diff"] <= 2e-3


@pytest.mark.parametrize("which", ["export/hf", "ppo/checkpoints/step-0000002"])
def test_chat_streams_multi_turn_replies_with_reset_and_exit(tiny_run, which):
    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "chat", str(tiny_run["run"] / which),
                        "--max-new-tokens", "6", "--seed", "0"],
                       input="Hello there\nAnd a second turn\n/reset\nStarting over\n/exit\nnot read\n",
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("rlhfkit chat") and "[conversation reset]" in p.stdout


def test_chat_keeps_the_turns_until_reset(tiny_run):
    import io

    from rlhfkit.chat import chat, load_chat_model

    model, tok = load_chat_model(str(tiny_run["run"] / "export" / "hf"))
    seen = []
    render = tok.apply_chat_template
    tok.apply_chat_template = lambda history, **kw: seen.append([t["role"] for t in history]) or render(history, **kw)
    out = io.StringIO()
    history = chat(model, tok, max_new_tokens=4, stdin=io.StringIO("one\ntwo\n/reset\nthree\n/exit\nfour\n"),
                   stdout=out, seed=0)
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]  # the second turn sees the first
    assert [t["content"] for t in history if t["role"] == "user"] == ["three"]  # /reset forgot; /exit stopped
    assert "[conversation reset]" in out.getvalue()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if os.geteuid() != 0:
        install = ["sudo", "-n", *install]
    r = subprocess.run(install, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(install[:-4] + ["update", "-q"], capture_output=True, timeout=600)
        r = subprocess.run(install, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, f"could not install Debian chromium: {r.stderr[-1500:]}"
    return found


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    import numpy as np
    from PIL import Image

    report = tiny_run["run"] / "report.html"
    chromium = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,1600", report.as_uri()],
                   capture_output=True, timeout=180, check=True)
    image = Image.open(shot).convert("L")
    lo, hi = image.getextrema()
    assert hi - lo > 100, "the screenshot is blank"
    assert len(np.unique(np.asarray(image.resize((64, 80))))) > 10  # text, plots and table, not a flat page
    dom = subprocess.run([chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=180, check=True).stdout
    assert 'id="eval-table"' in dom and "phase3_eval" in dom and dom.count("<img") >= 3


def test_killed_mid_ppo_the_same_command_finishes_without_redoing_sft_or_rm(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))
    cfg = pipeline_config(tmp_path, data, ppo={"steps": 6, "save_every": 2, "eval_every": 0})
    ckpt = tmp_path / "run" / "ppo" / "checkpoints" / "step-0000002" / "COMPLETE"
    kill_when(["pipeline", str(cfg), "--no-progress"], ckpt)
    assert not (tmp_path / "run" / "ppo" / "final").exists()
    sft_mtime = (tmp_path / "run" / "sft" / "final" / "model.safetensors").stat().st_mtime
    out = run_ok(["pipeline", str(cfg), "--no-progress"])
    assert "pipeline: sft is complete, skipped" in out and "pipeline: rm is complete, skipped" in out
    assert "ppo: resumed at step" in out
    assert (tmp_path / "run" / "ppo" / "final" / "eval.json").is_file()
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").stat().st_mtime == sft_mtime
    # --from reruns that stage and everything after it, and nothing before
    out = run_ok(["pipeline", str(cfg), "--no-progress", "--from", "eval"])
    assert "pipeline: ppo is complete, skipped" in out and "pipeline: eval done" in out

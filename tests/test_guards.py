"""Run guards: resume only under the same settings, one run per output dir, SIGTERM, divergence, damaged
checkpoints, machine faults (disk full, read-only), half-precision exports of the master weights."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from test_training import ENV, _final_weights, cli, kill_when, run_ok, synthetic_pairs, write_config
from rlhfkit.config import TrainConfig, load_config
from rlhfkit.engine.backend import TrainEngine, param_groups
from rlhfkit.errors import ConfigError
from rlhfkit.tracking import read_metrics


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))


def run_fails(args, timeout=300, **popen) -> str:
    p = cli(args, **popen)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def ckpt_marker(root: Path, step: int) -> Path:
    return root / "run" / "sft" / "checkpoints" / f"step-{step:07d}" / "COMPLETE"


def test_resume_under_changed_settings_is_refused_and_force_applies_the_new_ones(tmp_path, pairs_file):
    sft = {"max_steps": 6, "save_every": 2, "learning_rate": 3e-3, "lr_scheduler": "constant"}
    cfg = str(write_config(tmp_path, pairs_file, sft=sft))
    kill_when(["sft", cfg, "--no-progress"], ckpt_marker(tmp_path, 4))

    out = run_fails(["sft", cfg, "--no-progress", "sft.learning_rate=1e-2", "data.max_seq_len=100"])
    assert "sft.learning_rate: 0.003 → 0.01" in out and "data.max_seq_len: 96 → 100" in out
    assert "sft.resume=force" in out and "resume=never" in out
    run_fails(["sft", cfg, "--no-progress", "sft.learning_rate=1e-2"])  # one changed key is enough

    out = run_ok(["sft", cfg, "--no-progress", "sft.learning_rate=1e-2", "sft.resume=force"])
    assert "resuming under changed settings" in out and "resumed from" in out
    assert "Loading weights" not in out  # --no-progress also silences transformers' bars
    lrs = [m["train/lr"] for m in read_metrics(tmp_path / "run" / "sft" / "metrics.jsonl") if "train/lr" in m]
    assert lrs[:4] == [3e-3] * 4 and lrs[-1] == pytest.approx(1e-2)  # the new rate is used, not the checkpoint's


def test_settings_that_do_not_change_the_math_resume(tmp_path, pairs_file):
    sft = {"max_steps": 4, "save_every": 2, "learning_rate": 3e-3, "micro_batch_size": 4}
    cfg = str(write_config(tmp_path, pairs_file, sft=sft))
    kill_when(["sft", cfg, "--no-progress"], ckpt_marker(tmp_path, 2))
    out = run_ok(["sft", cfg, "--no-progress", "sft.micro_batch_size=2", "sft.gradient_accumulation_steps=2",
                  "sft.eval_every=1", "sft.keep_checkpoints=3"])
    assert "resumed from" in out


def test_one_run_per_output_dir_and_a_stale_lock_is_taken_over(tmp_path, pairs_file):
    cfg = str(write_config(tmp_path, pairs_file, sft={"max_steps": 2}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rlhfkit.train.guards import lock_output_dir; "
         "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(tmp_path / "run")],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = run_fails(["sft", cfg, "--no-progress"])
        assert f"in use by another rlhfkit run (pid {holder.pid} on" in out
    finally:
        holder.kill()
        holder.wait()
    run_ok(["sft", cfg, "--no-progress"])  # the killed holder's lock is taken over


def test_sigterm_stops_cleanly_and_resume_passes_over_a_damaged_checkpoint(tmp_path, pairs_file):
    sft = {"max_steps": 8, "save_every": 2, "keep_checkpoints": 3, "learning_rate": 3e-3, "warmup_steps": 2}
    run_ok(["sft", str(write_config(tmp_path / "a", pairs_file, sft=sft)), "--no-progress"])

    cfg = str(write_config(tmp_path / "b", pairs_file, sft=sft))
    p = cli(["sft", cfg, "--no-progress"], start_new_session=True)
    while not ckpt_marker(tmp_path / "b", 4).exists():
        assert p.poll() is None, p.stdout.read()[-2000:]
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143 and "terminated (SIGTERM)" in out and "Traceback" not in out, out[-2000:]
    run = tmp_path / "b" / "run" / "sft"
    assert not (run / "final").exists()

    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = newest / "engine" / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    state.write_bytes(bytes(data))
    out = run_ok(["sft", cfg, "--no-progress"])
    assert f"checkpoint {newest} is damaged ({state.relative_to(newest)} does not match its SHA-256)" in out
    assert "resumed from" in out and str(newest) not in out.split("resumed from")[1].splitlines()[0]
    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_run_stops_at_the_step_names_the_checkpoint_and_publishes_nothing(tmp_path, pairs_file):
    cfg = str(write_config(tmp_path, pairs_file, sft={"max_steps": 8, "save_every": 1, "learning_rate": 1e30,
                                                       "max_nonfinite_steps": 2}))
    out = run_fails(["sft", cfg, "--no-progress"])
    assert "update skipped (1 of sft.max_nonfinite_steps=2 allowed)" in out
    assert "update skipped (2 of" in out
    assert "training diverged at step 4: train/grad_norm = nan" in out, out[-2000:]
    # skipped updates leave the weights as step 1 made them, so the checkpoints after it are good too
    assert "the last good checkpoint is" in out and "step-0000003" in out
    run = tmp_path / "run" / "sft"
    assert not (run / "final").exists()
    norms = [m["train/grad_norm"] for m in read_metrics(run / "metrics.jsonl") if "train/grad_norm" in m]
    assert len(norms) == 4 and math.isfinite(norms[0]) and all(math.isnan(x) for x in norms[1:])  # logged, not dropped


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_non_finite_step_leaves_the_weights_alone(zero_stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    t = TrainConfig(zero_stage=zero_stage, learning_rate=1e-2, dtype="float32", lr_scheduler="constant")
    engine = TrainEngine(model, t, 10, param_groups(model, 1e-2, 0.0))
    x = torch.randn(4, 8)
    engine.backward(engine(x).sum())
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(engine(x).sum() * float("nan"))
    assert engine.skipped_steps == 1 and not math.isfinite(engine.grad_norm())
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    engine.backward(engine(x).sum())
    assert math.isfinite(engine.grad_norm()) and not torch.equal(before[0], next(engine.module.parameters()))


def test_a_zero_gradient_is_said_once(tmp_path, capsys):
    from rlhfkit.train.guards import NonFiniteGuard

    guard = NonFiniteGuard("sft", tmp_path, 0)
    guard.check(3, {"train/loss": 0.69, "train/grad_norm": 0.0})
    guard.check(4, {"train/loss": 0.69, "train/grad_norm": 0.0})
    assert capsys.readouterr().out.count("gradient norm is exactly 0 at step 3") == 1


def test_bf16_training_exports_the_fp32_master_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
    t = TrainConfig(zero_stage=1, learning_rate=1e-3, dtype="bfloat16", lr_scheduler="constant")
    engine = TrainEngine(model, t, 10, param_groups(model, 1e-3, 0.0))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for _ in range(3):
        engine.backward(engine(x).float().sum())
    sd = engine.full_state_dict()
    w = sd["0.weight"]
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert not torch.equal(w, w.bfloat16().float())  # values a bf16 copy cannot hold: the master weights


def test_zero3_eval_with_uneven_shards_does_not_hang(tmp_path, pairs_file):
    """17 eval rows on 2 ranks with micro-batch 8: 9 rows (2 forwards) and 8 rows (1) before the fix."""
    evals = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(17))
    cfg = write_config(tmp_path, pairs_file, sft={"max_steps": 1, "micro_batch_size": 8, "zero_stage": 3})
    raw = json.loads(json.dumps(load_config(cfg).model_dump(mode="json")))
    raw["data"]["datasets"][0]["eval_path"] = str(evals)
    cfg.write_text(json.dumps(raw))
    p = cli(["sft", str(cfg), "--no-progress"], nproc=2)
    try:
        out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("ZeRO-3 eval hung")
    assert p.returncode == 0, out[-3000:]


def test_an_output_dir_that_is_a_file_is_an_error(tmp_path, pairs_file):
    cfg = str(write_config(tmp_path, pairs_file, sft={"max_steps": 1}))
    (tmp_path / "run").write_text("not a dir")
    assert "is a file" in run_fails(["sft", cfg, "--no-progress"])


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.mark.parametrize("options, said", [("size=2m", "No space left on device"),
                                           ("ro,size=1m", "cannot write to the output dir")])
def test_a_full_or_read_only_disk_gives_a_message(tmp_path, pairs_file, options, said):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, options)
    try:
        cfg = write_config(tmp_path, pairs_file, sft={"max_steps": 2, "save_every": 1})
        raw = load_config(cfg).model_dump(mode="json")
        raw["run"]["output_dir"] = str(disk / "run")
        cfg.write_text(json.dumps(raw))
        out = run_fails(["sft", str(cfg), "--no-progress"])
        assert said in out, out[-2000:]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_finished_stage_under_changed_settings_stops_the_pipeline(tmp_path, pairs_file):
    from rlhfkit.pipeline import check_unchanged

    cfg = write_config(tmp_path, pairs_file, sft={"max_steps": 2})
    run_ok(["sft", str(cfg), "--no-progress"])
    check_unchanged(load_config(cfg), "sft")  # unchanged: skipped as before
    with pytest.raises(ConfigError, match=r"(?s)sft finished with other settings.*sft.epochs: 1 → 3.*--from sft"):
        check_unchanged(load_config(cfg, ["sft.epochs=3"]), "sft")


def test_a_diverging_ppo_run_stops_and_publishes_nothing(tmp_path):
    from test_ppo import ppo_config
    from rlhfkit.train.guards import NonFiniteError
    from rlhfkit.train.ppo.trainer import run_ppo
    from ppo_known_reward import TargetTokenReward

    prompts = write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(40))
    cfg = ppo_config(tmp_path, prompts, steps=6, eval_every=0, eval_prompts=4, save_every=1,
                     actor={"learning_rate": 1e30, "micro_batch_size": 4},
                     critic={"learning_rate": 1e30, "micro_batch_size": 4})
    with pytest.raises(NonFiniteError, match=r"ppo: training diverged at step \d: .*nan.*ppo.actor.max_nonfinite_steps"):
        run_ppo(load_config(cfg), show_progress=False, reward_model=TargetTokenReward())
    assert not (tmp_path / "run" / "ppo" / "final").exists()


def test_a_setting_added_since_the_checkpoint_blocks_a_resume_only_where_it_is_not_at_its_default():
    from rlhfkit.train.guards import fingerprint_changes

    old = {"ppo.kl_coef": 0.05, "ppo.steps": 60}  # recorded before ppo.max_turns and ppo.tools existed
    assert fingerprint_changes(old, {**old, "ppo.max_turns": 1, "ppo.tools": []}) == []
    assert fingerprint_changes(old, {**old, "ppo.max_turns": 3}) == ["ppo.max_turns: (unset) → 3"]
    assert fingerprint_changes(old, {**old, "ppo.kl_coef": 0.1}) == ["ppo.kl_coef: 0.05 → 0.1"]
    assert fingerprint_changes({**old, "ppo.max_turns": 1}, old) == ["ppo.max_turns: 1 → (unset)"]

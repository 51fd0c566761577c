"""Issue 19, run guards: resume=never starts clean, file systems without flock, the lock in forked children,
an unreadable fingerprint, a disk that fills during a checkpoint, a run that collapses without going non-finite."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config, write_jsonl
from test_training import ENV, synthetic_pairs


def sft_config(tmp_path: Path, data: Path, **sft):
    cfg = make_config(tmp_path, [{"name": "d", "path": str(data)}])
    cfg.sft = cfg.sft.model_copy(update={"micro_batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant",
                                         **sft})
    return cfg


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40))


def steps_in(run: Path) -> list[str]:
    return sorted(d.name for d in (run / "sft" / "checkpoints").iterdir())


# --- item 2: resume=never ----------------------------------------------------------------------------

def test_resume_never_deletes_the_old_runs_checkpoints_before_its_own(tmp_path, pairs, capsys):
    """The old run's step 6 outranked the new run's step 2 when pruning to keep_checkpoints=1: the new final
    checkpoint was deleted and final/ copied from a deleted dir (and a later resume would take old step 6)."""
    from rlhfkit.engine.backend import latest_checkpoint
    from rlhfkit.train.sft import run_sft

    run = tmp_path / "run"
    run_sft(sft_config(tmp_path, pairs, max_steps=6, save_every=3, keep_checkpoints=1), show_progress=False)
    assert steps_in(run) == ["step-0000006"]
    capsys.readouterr()
    run_sft(sft_config(tmp_path, pairs, max_steps=2, save_every=0, keep_checkpoints=1, resume="never"),
            show_progress=False)
    assert f"resume=never: deleted the earlier run's checkpoints under {run / 'sft' / 'checkpoints'} " \
           "(step-0000006)" in capsys.readouterr().out
    assert steps_in(run) == ["step-0000002"]
    assert latest_checkpoint(run / "sft").name == "step-0000002"
    final = load_file(str(run / "sft" / "final" / "model.safetensors"))
    ckpt = load_file(str(run / "sft" / "checkpoints" / "step-0000002" / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], ckpt[k]) for k in final)


# --- item 7: no flock ----------------------------------------------------------------------------------

def test_a_file_system_without_flock_gets_a_warning_stating_the_limits(tmp_path, monkeypatch, capsys):
    from rlhfkit.train import guards

    def no_locks(fd, op):  # what flock(2) answers on NFS without lockd (Lustre without -o flock: ENOSYS)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out_dir = tmp_path / "run"
    guards.lock_output_dir(out_dir)
    guards.lock_run(out_dir)  # the pipeline's call after the stage's: still a no-op
    err = capsys.readouterr().err
    assert f"cannot lock {out_dir / '.rlhfkit.lock'} (No locks available)" in err
    assert f"nothing stops a second run from writing into {out_dir} at the same time" in err
    assert "docs/multinode.md" in err and err.count("cannot lock") == 1
    assert f"pid {os.getpid()} on" in (out_dir / ".rlhfkit.lock").read_text()  # the holder is still named


# --- item 11: the lock in child processes, an unreadable fingerprint ---------------------------------

def open_files(pid) -> list[str]:
    """What the fds of a process point to (an fd may close while listed: listdir's own)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


HOLDER = r"""
import os, sys, time
from rlhfkit.train.guards import lock_output_dir
lock_output_dir(sys.argv[1])
r, w = os.pipe()
child = os.fork()  # as a DataLoader worker or a compile worker is started
if child == 0:
    os.write(w, b"x")  # fork() has returned here: the child's at-fork hooks have run
    time.sleep(120)
    os._exit(0)
os.read(r, 1)
held = []
for fd in os.listdir("/proc/self/fd"):
    try:
        held.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # listdir's own fd, closed by now
        pass
print(child, sys.argv[1] + "/.rlhfkit.lock" in held, flush=True)
time.sleep(120)
"""


def test_children_do_not_hold_the_lock(tmp_path):
    """A forked child shared the lock through the inherited fd: with the run killed, it kept the dir locked."""
    from rlhfkit.train.guards import lock_output_dir

    out_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child, holds = holder.stdout.readline().split()
        child = int(child)
        assert holds == "True"
        assert str(out_dir / ".rlhfkit.lock") not in open_files(child)
        holder.kill()
        holder.wait()
        lock_output_dir(out_dir)  # the killed run's lock is free, though its forked child still lives
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, signal.SIGKILL)
    started = subprocess.run(["ls", "-l", "/proc/self/fd"], capture_output=True, text=True, close_fds=False)  # exec
    assert ".rlhfkit.lock" not in started.stdout


def test_an_unreadable_fingerprint_is_said_before_resuming(tmp_path, capsys):
    from rlhfkit.train.guards import FINGERPRINT_FILE, guard_resume

    out_dir = tmp_path / "sft"
    out_dir.mkdir()
    (out_dir / FINGERPRINT_FILE).write_text('{"sft.learning_rate": 0.1')  # cut short
    guard_resume(out_dir, "sft", {"sft.learning_rate": 0.2}, "auto", has_checkpoints=True)
    out = capsys.readouterr().out
    assert f"warning: {out_dir / FINGERPRINT_FILE} cannot be read" in out and "not compared" in out
    assert json.loads((out_dir / FINGERPRINT_FILE).read_text()) == {"sft.learning_rate": 0.2}


# --- item 13: the disk fills while a checkpoint is written -----------------------------------------------

def test_a_disk_that_fills_during_a_checkpoint_says_so_and_leaves_no_half_checkpoint(tmp_path, pairs):
    """The data and the first eval fit on a 1.5 MB tmpfs, the first checkpoint (~2 MB) does not: torch.save's
    error ("[enforce fail at inline_container.cc] ... file write failed") never said the disk was full."""
    from test_guards import _mount_tmpfs, run_fails
    from test_training import write_config

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=1500k")
    try:
        cfg = write_config(tmp_path, pairs, sft={"max_steps": 2, "save_every": 1, "micro_batch_size": 4})
        out = run_fails(["sft", str(cfg), "--no-progress", f"run.output_dir={disk / 'run'}"])
        ckpt = disk / "run" / "sft" / "checkpoints" / "step-0000001"
        assert f"rlhfkit: error: disk full while writing checkpoint {ckpt} (" in out, out[-3000:]
        assert "free space and rerun the same command to resume" in out
        assert list((disk / "run" / "sft" / "checkpoints").iterdir()) == []  # no half-written checkpoint
        assert "inline_container" not in out
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --- item 15: a run that collapses without going non-finite -------------------------------------------

def test_a_collapsed_run_stops_naming_the_stage_steps_and_cause(tmp_path, pairs):
    """Learning rate 1e6: the gradient norm is exactly 0 from step 2 on and the loss flat at ln(vocab size);
    the run ended with exit 0 and published the destroyed model as final/."""
    from test_guards import run_fails
    from test_training import write_config

    cfg = write_config(tmp_path, pairs, sft={"max_steps": 8, "learning_rate": 1e6, "save_every": 0})
    out = run_fails(["sft", str(cfg), "--no-progress"])
    assert ("sft: train/grad_norm has been exactly 0 at every step since step 2 (steps 2-4; train/loss = "
            in out), out[-3000:]
    assert "sft.learning_rate is far too high" in out and "Nothing was published as final/" in out
    assert not (tmp_path / "run" / "sft" / "final").exists()


def test_ppo_zero_gradients_warn_and_go_on(tmp_path, capsys):
    """PPO's policy gradient is exactly 0 when every advantage is (all rewards of a prompt equal): a warning."""
    from rlhfkit.train.guards import NonFiniteGuard

    guard = NonFiniteGuard("ppo", tmp_path, 0, "ppo.actor.max_nonfinite_steps")
    for step in range(1, 6):
        guard.check(step, {"loss/policy": 0.0, "loss/value": 0.3, "policy/grad_norm": 0.0 if step > 1 else 1.0,
                           "val/grad_norm": 0.5})
    out = capsys.readouterr().out
    assert out.count("ppo: WARNING: policy/grad_norm has been exactly 0 at every step since step 2 (steps 2-4") == 1
    assert "every advantage of these steps was 0" in out and "ppo.actor.learning_rate" in out

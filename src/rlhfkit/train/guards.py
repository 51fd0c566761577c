"""Run guards: what stops a run before it produces silently wrong results."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from ..engine import distributed as D
from ..errors import NonFiniteError, RlhfkitError
from ..paths import write_text_atomic


class NonFiniteGuard:
    """Counts optimizer steps with a non-finite loss or gradient norm (the backend skipped their update) and
    stops the run, naming the step and the last good checkpoint, once more than `tolerance` were seen.
    Also catches a run that collapsed without going non-finite: a gradient norm of exactly 0 for
    COLLAPSE_STEPS steps in a row (a huge learning rate saturated the model, which then learns nothing)."""

    COLLAPSE_STEPS = 3

    def __init__(self, stage: str, out_dir: Path, tolerance: int, setting: str | None = None):
        self.stage, self.out_dir, self.tolerance = stage, Path(out_dir), tolerance
        self.setting = setting or f"{stage}.max_nonfinite_steps"
        self.seen = 0
        self.warned_zero_grad = False
        self.zero_since: dict[str, int] = {}  # grad-norm key -> first step of its current run of exact zeros
        self.collapse_said: set[str] = set()

    def check(self, step: int, values: dict[str, float | None]) -> None:
        bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
        if not bad:
            self._warn_zero_gradient(step, values)
            self._check_collapse(step, values)
            return
        self.seen += 1
        shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
        if self.seen <= self.tolerance:
            if D.is_main():
                print(f"{self.stage}: step {step}: {shown}; update skipped ({self.seen} of "
                      f"{self.setting}={self.tolerance} allowed)", flush=True)
            return
        from ..engine.backend import checkpoint_dirs

        ckpts = checkpoint_dirs(self.out_dir)
        last = (f"the last good checkpoint is {ckpts[-1]}; rerun with a lower learning rate and "
                f"{self.stage}.resume=force to continue from it, or {self.stage}.resume=never to start over"
                if ckpts else "no checkpoint was saved before it; rerun with a lower learning rate")
        raise NonFiniteError(f"{self.stage}: training diverged at step {step}: {shown}. Nothing was published "
                             f"as final/; {last} (or allow skipped steps with {self.setting}).")

    def _warn_zero_gradient(self, step: int, values: dict) -> None:
        """A gradient of exactly 0 with a finite loss: the model is saturated (e.g. a huge learning rate
        blew the logits up) and can no longer learn. Say so once; the run goes on."""
        norms = [v for k, v in values.items() if k.endswith("grad_norm") and v is not None]
        if norms and all(v == 0.0 for v in norms) and not self.warned_zero_grad and D.is_main():
            self.warned_zero_grad = True
            print(f"{self.stage}: warning: gradient norm is exactly 0 at step {step}; the model is no longer "
                  "learning (saturated outputs? check the learning rate)", flush=True)

    def _check_collapse(self, step: int, values: dict) -> None:
        """COLLAPSE_STEPS optimizer steps in a row with a gradient norm of exactly 0 (never seen in a run that
        learns: a real gradient is not exactly 0): SFT, RM and DPO stop, publishing nothing, since every later
        stage would build on a destroyed model. PPO warns only: a batch whose advantages are all 0 (GRPO with
        every reward of a group equal, e.g. all answers wrong) has an exactly-0 policy gradient too."""
        for key, v in values.items():
            if not key.endswith("grad_norm") or v is None:
                continue
            if v != 0.0 or step <= 1:  # step 1 is measured on the untouched model
                self.zero_since.pop(key, None)
                continue
            first = self.zero_since.setdefault(key, step)
            if step - first + 1 < self.COLLAPSE_STEPS or key in self.collapse_said:
                continue
            self.collapse_said.add(key)
            losses = ", ".join(f"{k} = {x:.6g}" for k, x in values.items() if "loss" in k and x is not None)
            what = (f"{key} has been exactly 0 at every step since step {first} (steps {first}-{step}"
                    f"{'; ' + losses if losses else ''}): the model stopped learning without going non-finite.")
            if self.stage == "ppo":
                if D.is_main():
                    print(f"{self.stage}: WARNING: {what} Either every advantage of these steps was 0 (all rewards "
                          "of each prompt's samples equal: the reward gives no signal yet), or the learning rate is "
                          "far too high and the updates destroyed the model (a loss stuck at ln(vocabulary size) "
                          "means uniform predictions); check ppo.actor.learning_rate and the rewards.", flush=True)
                continue
            from ..engine.backend import checkpoint_dirs

            spoiled = [c.name for c in checkpoint_dirs(self.out_dir) if int(c.name.split("-")[1]) >= first - 1]
            raise TrainingCollapsedError(
                f"{self.stage}: {what} The updates destroyed the model: its outputs saturated, most likely because "
                f"{self.stage}.learning_rate is far too high (a loss stuck at ln(vocabulary size) means uniform "
                f"predictions). Nothing was published as final/; rerun with a lower learning rate and "
                f"{self.stage}.resume=never" + (f" (checkpoints {', '.join(spoiled)} hold the collapsed model)."
                                                 if spoiled else "."))


class TrainingCollapsedError(NonFiniteError):
    """Training stopped learning (gradient exactly 0 for several steps) without a non-finite value."""


# --- one run per output dir --------------------------------------------------------------------------
_held: dict[Path, int] = {}  # locks this process holds: path -> open fd (kept open: the lock lives with it)


def _close_held_in_child() -> None:
    """A forked child (a DataLoader worker, a compile worker) shares the lock with its parent through the
    inherited fd, and would keep the dir locked after the parent died: it closes its copies. (An exec'd child
    never gets them: os.open's fds are close-on-exec.)"""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def lock_output_dir(out_dir: Path) -> None:
    """Hold an exclusive lock on the run's output dir for the life of this process.

    flock(2) is released by the kernel when its holder dies, so a lock left by a killed run is taken over
    without a word; a live holder is named by the pid it wrote. Taking it twice in one process (the
    pipeline runs several stages) is a no-op. A file system without flock (Lustre mounted without `flock`,
    some NFS set-ups) gets a warning and no lock (docs/multinode.md)."""
    out_dir = Path(out_dir)
    path = out_dir / ".rlhfkit.lock"
    if path in _held:
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise RlhfkitError(f"output dir {out_dir} is a file; set run.output_dir to a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RlhfkitError(f"cannot write to the output dir {out_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RlhfkitError(f"{out_dir} is in use by another rlhfkit run ({holder}); wait for it to finish, "
                           "or give this run another run.output_dir") from None
    except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: this file system does not lock (Lustre noflock, NFS)
        print(f"rlhfkit: warning: cannot lock {path} ({e.strerror or e}): this file system does not support "
              f"flock. Running without the lock: nothing stops a second run from writing into {out_dir} at the "
              "same time (and mixing checkpoints); make sure only one run uses it (see docs/multinode.md).",
              file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held[path] = fd


def lock_run(out_dir: Path) -> None:
    """lock_output_dir on rank 0, the outcome shared: if rank 0 cannot have it, every rank stops."""
    error = None
    if D.is_main():
        try:
            lock_output_dir(out_dir)
        except RlhfkitError as e:
            error = e
    if D.all_reduce_min(0 if error else 1) == 0:
        raise error or RlhfkitError(f"rank 0 could not lock {out_dir}")


# --- resume only under the settings a checkpoint was made with ---------------------------------------
# Keys of a training section that do not change what is computed (or are planned/recorded elsewhere).
NOT_MATH = {"eval_every", "eval_at_start", "max_eval_batches", "save_every", "keep_checkpoints", "log_every", "resume",
            "max_nonfinite_steps", "micro_batch_size", "packing", "gradient_accumulation_steps",
            "gradient_checkpointing",
            "offload_optimizer", "offload_param", "eval_prompts", "samples_logged", "generation_batch_size",
            "rollout_decoding"}  # every decoding loop samples the same tokens (tests/test_static_decode.py)
FINGERPRINT_FILE = "fingerprint.json"


def stage_fingerprint(cfg, stage: str, inputs: dict[str, str]) -> dict[str, object]:
    """Flat {key: value} of what a stage's checkpoints depend on: its math settings (the section with
    micro-batch size replaced by the global batch size, which is what the math sees), the model and data
    sections with the identity of each data file, the models it starts from, and the world size."""
    world = D.init_distributed()[1]
    section = getattr(cfg, stage).model_dump(mode="json")
    fp: dict[str, object] = {}
    _flatten(fp, stage, section)
    if stage != "ppo":  # PPO's batches are ppo.rollout_batch_size / mini_batch_size, in the section
        t = getattr(cfg, stage)
        fp[f"{stage}.global_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world
    _flatten(fp, "model", cfg.model.model_dump(mode="json"))
    _flatten(fp, "data", cfg.data.model_dump(mode="json"))
    fp["run.seed"] = cfg.run.seed
    fp["world_size"] = world
    for ds in cfg.data.datasets:
        for key in ("path", "eval_path"):
            if getattr(ds, key):
                fp[f"data file {getattr(ds, key)}"] = file_identity(Path(getattr(ds, key)))
    for role, path in inputs.items():
        fp[f"input {role}"] = f"{path} @ {file_identity(Path(path))}"
    return {k: v for k, v in fp.items() if k.rsplit(".", 1)[-1] not in NOT_MATH}


def _flatten(out: dict, prefix: str, value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(out, f"{prefix}.{k}", v)
    else:
        out[prefix] = value


def file_identity(path: Path) -> str:
    """Size and modification time of a file, or of a model dir's files: changes when the content is
    rewritten, at no cost for multi-GB files (a hash would read them all)."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        h = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode())
        return h.hexdigest()[:16]
    return "missing" if any(sep in str(path) for sep in ("/", os.sep)) else "hub or built-in name"


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """The keys whose values differ. A key the old record lacks (a setting added to rlhfkit since) counts as
    changed only where today's value is not its default: an upgrade alone does not block a resume."""
    keys = sorted(set(old) | set(new))
    unset = "(unset)"
    return [f"{k}: {_shown(old.get(k, unset))} → {_shown(new.get(k, unset))}" for k in keys
            if old.get(k, unset) != new.get(k, unset)
            and not (k not in old and new.get(k) == schema_default(k, unset))]


def schema_default(dotted: str, missing):
    """The default of a flattened config key (`ppo.max_turns`, `ppo.actor.lora.r`), as JSON; `missing` where
    the key is not a schema field or has no default (`model`, `data` and stage sections are Config's)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from ..config import Config

    model, value = Config, missing
    for part in dotted.split("."):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return missing
        if field.default_factory is not None:
            value = field.default_factory()
        elif field.default is PydanticUndefined:
            return missing
        else:
            value = field.default
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif model is None and part != dotted.split(".")[-1]:
            return missing
    return json.loads(json.dumps(value, default=str))


def _shown(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


def recorded_changes(out_dir: Path, fingerprint: dict) -> list[str]:
    """How the settings differ from those a stage's outputs were made with ([] when unknown)."""
    path = Path(out_dir) / FINGERPRINT_FILE
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else None
        if recorded is not None and not isinstance(recorded, dict):
            raise ValueError(f"a JSON object was expected, not {type(recorded).__name__}")
    except (OSError, ValueError) as e:
        if D.is_main():
            print(f"rlhfkit: warning: {path} cannot be read ({e}): the settings {Path(out_dir).name}'s outputs were "
                  "made with are unknown, so they are not compared with today's (a resume goes on unchecked; "
                  "delete the dir to start fresh)", flush=True)
        return []
    return fingerprint_changes(recorded, fingerprint) if recorded is not None else []


def guard_resume(out_dir: Path, stage: str, fingerprint: dict, resume: str, has_checkpoints: bool) -> None:
    """Stop before resuming a checkpoint made under other settings (it would silently mix the two);
    otherwise record the fingerprint the checkpoints about to be written depend on. Rank 0's record decides for
    every rank (nodes without a shared disk have it on rank 0's only), so all stop or go on together."""
    path = Path(out_dir) / FINGERPRINT_FILE
    changes = D.broadcast_object(recorded_changes(out_dir, fingerprint) if D.is_main() and has_checkpoints else [])
    if changes and resume != "never":
        if resume == "auto":
            listed = "\n  ".join(changes)
            raise RlhfkitError(
                f"{out_dir} has checkpoints of a {stage} run made with other settings:\n  {listed}\n"
                f"Start fresh: delete {out_dir} (or set {stage}.resume=never, or `rlhfkit pipeline --from {stage}`);"
                f" continue from the checkpoint under the new settings anyway: {stage}.resume=force")
        if D.is_main():
            print(f"{stage}: resuming under changed settings ({stage}.resume=force): " + "; ".join(changes), flush=True)
    if resume == "never":  # before the new fingerprint: the old steps must not mix with this run's
        clear_checkpoints(out_dir, stage)
    if D.is_main():
        write_text_atomic(path, json.dumps(fingerprint, indent=1, sort_keys=True))
    D.barrier()


def clear_checkpoints(out_dir: Path, stage: str) -> None:
    """Collective: delete the checkpoints of an earlier run on every disk (resume=never). Left there, they
    would be pruned together with this run's by step number (deleting this run's newer but lower-numbered
    steps) and be resumed later under this run's fingerprint."""
    base = Path(out_dir) / "checkpoints"
    if D.leads_disk(out_dir) and base.exists():
        steps = sorted(d.name for d in base.iterdir() if d.name.startswith("step-"))
        old = base.with_name(f".checkpoints.old-{os.getpid()}")
        os.replace(base, old)  # one rename: a crash mid-delete leaves no half-deleted step to resume
        shutil.rmtree(old, ignore_errors=True)
        if steps:
            print(f"{stage}: resume=never: deleted the earlier run's checkpoints under {base} ({', '.join(steps)})",
                  flush=True)
    D.barrier()

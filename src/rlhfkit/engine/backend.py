"""The one training backend: a model stepped by DeepSpeed (ZeRO 0-3, offload, bf16/fp16/fp32).

SFT, RM, DPO (and later the PPO actor and critic) all step through this class; they differ only in their
loss and data. A plain single process is a world of one (no launcher needed); under torchrun or the
`deepspeed` launcher the same code runs data-parallel over gloo (CPU) or NCCL (GPU).

Loss scaling contract: each micro-batch passes `loss_sum / global_units` — its summed loss divided by
the number of units (target tokens, pairs) in the whole optimizer step over all ranks. DeepSpeed divides
by gradient_accumulation_steps and averages over ranks, so `backward` multiplies both back: the step's
gradient is then exactly that of the global mean, however the step was cut into micro-batches and ranks.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import RlhfkitError
from ..paths import file_listing, listing_problem, publish_dir, write_text_atomic
from . import distributed as D
from .precision import resolve_dtype


def effective_zero_stage(t: TrainConfig) -> int:
    """bf16/fp16 at ZeRO-0 would keep gradients in half precision (DeepSpeed's unfused fp16 optimizer);
    ZeRO-1 keeps fp32 master weights and gradients at the same cost on one process, so use it."""
    return 1 if t.zero_stage == 0 and t.dtype != "float32" else t.zero_stage


def deepspeed_config(t: TrainConfig, world: int) -> dict:
    zero: dict = {"stage": effective_zero_stage(t)}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather fp32 weights ourselves
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bfloat16"},
        "fp16": {"enabled": t.dtype == "float16", "initial_scale_power": 16},
        # A torch AdamW is our client optimizer on every stage, offload included.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                 lr_by_name: dict[str, float | None] | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: no weight decay on biases and norms; a parameter whose
    name contains a key of lr_by_name (e.g. "lora_", "v_head.") trains at that learning rate (None: lr)."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        group_lr = next((v for k, v in (lr_by_name or {}).items() if k in name and v is not None), lr)
        groups.setdefault((group_lr, no_decay), []).append(p)
    return [{"params": params, "lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay}
            for (group_lr, no_decay), params in sorted(groups.items())]


def build_optimizer(param_groups: list[dict], t: TrainConfig) -> torch.optim.Optimizer:
    fused = torch.cuda.is_available() and not t.offload_optimizer
    return torch.optim.AdamW(param_groups, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=1e-8,
                             weight_decay=t.weight_decay, fused=fused or None)


def build_scheduler(optimizer, t: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class TrainEngine:
    def __init__(self, model: torch.nn.Module, t: TrainConfig, total_steps: int, param_groups: list[dict]):
        import deepspeed

        self.rank, self.world = D.init_distributed()
        t = t.model_copy(update={"dtype": resolve_dtype(t.dtype)})
        self.cfg = t
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "config"):
                model.config.use_cache = False
        optimizer = build_optimizer(param_groups, t)
        scheduler = build_scheduler(optimizer, t, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, self.world))
        self._scale = t.gradient_accumulation_steps * self.world
        self._zero_stage = effective_zero_stage(t)
        self._grad_norm: float | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, normalized_loss: torch.Tensor) -> None:
        """Backward one micro-batch, then let DeepSpeed step the optimizer at the accumulation boundary."""
        self.engine.backward(normalized_loss * self._scale)
        if self._zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed reports no grad norm at ZeRO-0; the gradients are plain .grad tensors here.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
            if self._grad_norm is not None and not math.isfinite(self._grad_norm):
                self._skip_this_update()
                return
        self.engine.step()

    def _skip_this_update(self) -> None:
        """Step DeepSpeed's bookkeeping without touching weights or optimizer state, the way its ZeRO
        optimizers skip a step whose gradients overflowed: it sees `overflow`, counts a skipped step and
        leaves the LR schedule where it is."""
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        self.optimizer.overflow = True
        self.optimizer.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            del self.optimizer.overflow, self.optimizer.step

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient (fp16's loss-scale overflows not counted)."""
        return 0 if self.cfg.dtype == "float16" else int(self.engine.skipped_steps)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        """Global gradient norm (before clipping) of the last optimizer step."""
        if self._zero_stage == 0:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    # --- weights -----------------------------------------------------------------------------------
    def full_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (None elsewhere; on every rank with all_ranks), gathered one
        parameter at a time under ZeRO-3. Trained in half precision: the fp32 master weights."""
        import deepspeed

        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        zero3 = self._zero_stage == 3
        keep = all_ranks or self.rank == 0
        # Trained in bf16/fp16, the module holds half-precision copies; export the optimizer's fp32 master
        # weights instead (a collective under ZeRO, so every rank asks). Frozen params have none.
        half = self.cfg.dtype != "float32"
        for name, p in self.module.named_parameters():
            master = safe_get_full_fp32_param(p) if half and p.requires_grad else None
            if master is not None:
                if keep:
                    out[name] = master.detach().to("cpu", torch.float32, copy=True)
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=zero3):
                if keep:
                    out[name] = _dense(p).to("cpu", torch.float32, copy=True)
        if keep:
            persistent = self.module.state_dict().keys()
            for name, b in self.module.named_buffers():
                if name in persistent:
                    out[name] = b.detach().to("cpu", copy=True)
        return out if keep else None

    # --- training state --------------------------------------------------------------------------
    def save_state(self, ckpt_dir: Path, client_state: dict) -> None:
        """Optimizer, scheduler, weights (DeepSpeed's own format, all ranks) and per-rank RNG states."""
        if D.leads_disk(ckpt_dir):  # DeepSpeed writes its replicated model-states file on rank 0 only; every
            self.engine.save_non_zero_checkpoint = True  # disk's part of the checkpoint needs one (ZeRO 0-2)
        try:
            self.engine.save_checkpoint(str(ckpt_dir / "engine"), tag="state", client_state=client_state,
                                        save_latest=False)
            torch.save(_rng_state(), ckpt_dir / f"rng_rank{self.rank}.pt")
        except (OSError, RuntimeError) as e:
            full = checkpoint_write_failure(e)
            if full:
                raise DiskFullError(full) from None
            raise

    def load_state(self, ckpt_dir: Path) -> dict:
        """Weights, optimizer moments, schedule position and RNG of a checkpoint. The hyperparameters stay
        those of this run's config (torch's load_state_dict would bring back the checkpoint's): equal when
        the settings did not change, and the new ones from here on under resume=force."""
        groups = self.optimizer.param_groups
        configured = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        _, client_state = self.engine.load_checkpoint(str(ckpt_dir / "engine"), tag="state",
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        sched = self.scheduler
        sched.base_lrs = [c["initial_lr"] for c in configured]
        for g, c, base, factor in zip(groups, configured, sched.base_lrs, sched.lr_lambdas):
            g.update({k: v for k, v in c.items() if k not in ("lr", "initial_lr")}, initial_lr=c["initial_lr"])
            g["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]
        rng = ckpt_dir / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return client_state or {}


def _dense(p: torch.Tensor) -> torch.Tensor:
    """A parameter's real values: bitsandbytes 4-bit weights (QLoRA) are dequantized for export."""
    if getattr(p, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(p.data, p.quant_state)
    return p.detach()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- checkpoint directories ------------------------------------------------------------------------
# A checkpoint is published by renaming its temp dir into place after COMPLETE is written into it, last.
# COMPLETE lists every file with its size and SHA-256, so a file lost or damaged later (a disk error, a
# partial copy between machines) is detected before a resume reads it.
#
# Nodes need not share a disk. Each disk (all of it when the filesystem is shared, else each node's) holds
# its own part of a checkpoint: the files its ranks wrote, published by that disk's leader (its lowest rank,
# `distributed.disk_leader`) with its own COMPLETE. A checkpoint is complete when every part is: resume takes
# the newest step whose part is intact on every disk, and old steps go only once every disk has the new one.
COMPLETE = "COMPLETE"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Published checkpoints under root/checkpoints (this disk's parts) whose files are all there at their
    recorded size, oldest first."""
    return [d for d in published_checkpoints(root) if checkpoint_problem(d, hashes=False) is None]


def published_checkpoints(root: Path) -> list[Path]:
    """Every checkpoint dir that was renamed into place (COMPLETE written), oldest first."""
    base = Path(root) / "checkpoints"
    if not base.is_dir():
        return []
    done = [d for d in base.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / COMPLETE).is_file()]
    return sorted(done, key=_step_of)


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint intact on every disk, saying which newer ones it passed over and why. Each disk's
    leader hashes its parts newest first, only as far back as needed. Collective: every rank calls it and
    gets the same step (under its own root)."""
    base = Path(root) / "checkpoints"
    disk = _DiskParts(root) if D.leads_disk(base) else None
    limit, chosen = math.inf, None
    while True:  # the newest step each disk holds intact (up to limit); their minimum, if every disk has it
        proposals = [p for p in D.all_gather_object(disk.newest_intact(limit) if disk else None) if p is not None]
        candidate = min(proposals)
        if candidate < 0:
            break
        if D.all_reduce_min(1 if disk is None or disk.intact(candidate) else 0):
            chosen = candidate
            break
        limit = candidate - 1
    parts = [p for p in D.all_gather_object(disk.report() if disk else None) if p is not None]
    if D.is_main():
        for why in _passed_over(parts, chosen, several=len(parts) > 1):
            print(f"rlhfkit: {why}; trying the one before it", flush=True)
    if chosen is not None:
        return base / f"step-{chosen:07d}"
    if any(p["problems"] for p in parts):
        raise RlhfkitError(f"every checkpoint under {base} is damaged (see above); start fresh with "
                           f"resume=never or delete {base}")
    if any(p["published"] for p in parts) and D.is_main():
        print("rlhfkit: no checkpoint was published on every node's disk (see above); starting fresh", flush=True)
    return None


class _DiskParts:
    """The checkpoint parts published on this disk, each hashed at most once, when first asked about."""

    def __init__(self, root: Path):
        self.base = Path(root) / "checkpoints"
        self.dirs = {_step_of(d): d for d in published_checkpoints(root)}
        self.problems: dict[int, str | None] = {}

    def intact(self, step: int) -> bool:
        if step not in self.dirs:
            return False
        if step not in self.problems:
            self.problems[step] = checkpoint_problem(self.dirs[step])
        return self.problems[step] is None

    def newest_intact(self, limit: float) -> int:
        return next((s for s in sorted(self.dirs, reverse=True) if s <= limit and self.intact(s)), -1)

    def report(self) -> dict:
        return {"base": str(self.base), "rank": D.rank(), "host": socket.gethostname(), "published": sorted(self.dirs),
                "problems": {s: p for s, p in self.problems.items() if p is not None}}


def _passed_over(parts: list[dict], chosen: int | None, several: bool) -> list[str]:
    """Why each step newer than the chosen one cannot be resumed: damaged on a disk, or absent from one."""
    newer = sorted({s for p in parts for s in p["published"] if chosen is None or s > chosen}, reverse=True)
    reasons = []
    for step in newer:
        for p in parts:
            name = Path(p["base"]) / f"step-{step:07d}"
            where = f" on rank {p['rank']}'s disk ({p['host']})" if several else ""
            if step not in p["published"]:
                reasons.append(f"checkpoint {name}{where} was never published (that node stopped first)")
            elif step in p["problems"]:
                reasons.append(f"checkpoint {name}{where} is damaged ({p['problems'][step]})")
    return reasons


def checkpoint_problem(ckpt: Path, hashes: bool = True) -> str | None:
    """None when every file COMPLETE lists is there with its size (and hash); else what is wrong."""
    try:
        listed = json.loads((ckpt / COMPLETE).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"{COMPLETE} unreadable: {e}"
    return listing_problem(ckpt, listed or {}, hashes)  # no list: written before lists existed


class DiskFullError(RlhfkitError):
    """The disk filled up while a checkpoint was written (its temp dir is deleted)."""


LOW_SPACE_BYTES = 64 << 20  # less free than this after a failed write: the disk is full
# what torch.save's writer says when a write fails (it drops the errno)
TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error")
_writing: Path | None = None  # the temp dir of the checkpoint this process is writing


def checkpoint_write_failure(e: BaseException) -> str | None:
    """The message for an error that means the disk filled while this process wrote a checkpoint, after
    deleting the half-written temp dir; None for anything else (or when no checkpoint is being written).
    torch.save's error says only "[enforce fail at inline_container.cc] ... file write failed" (or "basic_ios::clear:
    iostream error"), so besides ENOSPC/EDQUOT (or their text, as safetensors wraps them) a write error with the
    disk nearly full counts."""
    global _writing
    tmp = _writing
    if tmp is None or not isinstance(e, (OSError, RuntimeError)):
        return None
    quota = (isinstance(e, OSError) and e.errno == errno.EDQUOT) or os.strerror(errno.EDQUOT) in str(e)
    full = quota or (isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e)
    try:
        free = shutil.disk_usage(next(p for p in (tmp, *tmp.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    write_error = isinstance(e, OSError) or any(sign in str(e) for sign in TORCH_WRITE_ERRORS)
    if not full and (not write_error or free is None or free >= LOW_SPACE_BYTES):
        return None
    _writing = None
    shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint left taking the space
    step = tmp.parent / tmp.name.removeprefix(".tmp-")
    why = os.strerror(errno.EDQUOT if quota else errno.ENOSPC) + (f", {free >> 10} KiB free" if free is not None else "")
    return (f"disk full while writing checkpoint {step} ({why}): free space and rerun the same command to resume "
            f"(from the last complete checkpoint; the half-written one was deleted)")


def begin_checkpoint(root: Path, step: int) -> Path:
    """A temp dir every rank writes into (one per disk); `finish_checkpoint` renames each into place."""
    global _writing
    tmp = Path(root) / "checkpoints" / f".tmp-step-{step:07d}"
    if D.leads_disk(tmp.parent):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    _writing = tmp
    return tmp


def finish_checkpoint(tmp: Path, step: int, keep: int, meta: dict) -> Path:
    """Publish this disk's part (COMPLETE listing its files, then the rename); once every disk has published
    its part, drop the parts older than the newest `keep` (a node that stops before that keeps an older step
    every disk still has)."""
    global _writing
    final = tmp.parent / f"step-{step:07d}"
    D.barrier()  # every rank has written its part
    leader, error = D.leads_disk(tmp.parent), None
    if leader:
        try:
            files = file_listing(tmp, [f.relative_to(tmp) for f in sorted(tmp.rglob("*")) if f.is_file()])
            write_text_atomic(tmp / COMPLETE, json.dumps({**meta, "files": files}, indent=1))
            publish_dir(tmp, final)
        except OSError as e:
            error = e
    if D.all_reduce_min(0 if error else 1) == 0:
        if error:
            full = checkpoint_write_failure(error)
            if full:
                raise DiskFullError(full) from None
            raise error
        raise RlhfkitError(f"checkpoint step {step}: another node could not publish its part (its output says why)")
    _writing = None
    if leader:
        for old in published_checkpoints(tmp.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final

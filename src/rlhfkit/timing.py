"""Where a stage's wall time goes: training steps, evals, checkpoints, model loading, and the rest.

Each stage process has one clock (`start_stage` at its start). The loops charge their parts to it; what no
part claims is `other`, so the parts always add up to the stage's wall time. A training stage also counts
the model FLOPs of its steps, so its achieved FLOP/s can be set against the machine's measured matmul peak
at the stage's precision (engine/precision.py: matmul_peak_flops).

Model FLOPs per token (the usual 6·N rule, with frozen weights' gradients left out): 2·N forward, 2·N_backward
for the gradients of the activations (the layers from the lowest one that trains up), and 2·N_trainable for
the gradients of the weights, with N the parameters of the linear layers under the LM head. The LM head (run
only where a loss reads it), embeddings and the attention scores are left out, so the utilisation is a lower
bound (docs/performance.md).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

PARTS = ("train_steps", "eval", "checkpoint", "load")
TIMING_FILE = "timing.json"


class StageClock:
    def __init__(self, stage: str = ""):
        self.stage = stage
        self.started = time.perf_counter()
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.train_flops = 0.0
        self.peak_flops: float | None = None
        self.dtype: str | None = None
        self.extra: dict = {}  # other figures of the stage (the update probe's) kept beside the times
        self.claimed = False  # a stage's code has started on this clock (a second run gets a new one)

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds

    @contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def summary(self, wall: float | None = None) -> dict:
        """Seconds per part, `other` = wall − the parts, each part's share, and the training utilisation."""
        wall = time.perf_counter() - self.started if wall is None else wall
        parts = dict(self.parts)
        parts["other"] = max(wall - sum(parts.values()), 0.0)
        out = {"stage": self.stage, "wall_s": wall, "seconds": parts,
               "share": {k: v / wall if wall > 0 else 0.0 for k, v in parts.items()}}
        if self.train_flops and parts["train_steps"] > 0:
            achieved = self.train_flops / parts["train_steps"]
            out.update(dtype=self.dtype, train_flops=self.train_flops, achieved_flops_per_s=achieved,
                       peak_flops_per_s=self.peak_flops,
                       utilisation=achieved / self.peak_flops if self.peak_flops else None)
        out.update(self.extra)
        return out

    def write(self, out_dir: Path) -> dict:
        from .paths import write_text_atomic

        summary = self.summary()
        write_text_atomic(Path(out_dir) / TIMING_FILE, json.dumps(summary, indent=1))
        return summary


_clock = StageClock()


def start_stage(stage: str) -> StageClock:
    """A new clock for the stage this process starts now."""
    global _clock
    _clock = StageClock(stage)
    return _clock


def ensure_stage(stage: str) -> StageClock:
    """The clock of `stage`: the pipeline's, when it started the stage (its wall time then includes what the
    pipeline did first), else a new one."""
    mine = _clock if _clock.stage == stage and not _clock.claimed else start_stage(stage)
    mine.claimed = True
    return mine


def clock() -> StageClock:
    return _clock


def linear_params(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all, trainable, backward) parameters of the linear layers under the LM head: the weights a token's
    matmuls touch, those that train, and those the backward pass carries activation gradients through (from
    the lowest transformer layer with a trainable weight up; all where no layer is frozen whole).
    Half-precision copies and LoRA factors count like any other linear weight."""
    inner = model
    for attr in ("lm", "backbone"):  # TokenLogprobLM, RewardModel
        inner = getattr(inner, attr, inner)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None

    def count(modules):
        total = trainable = 0
        for module in modules:
            if isinstance(module, torch.nn.Linear) and module is not head:
                for p in module.parameters(recurse=False):
                    n = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 parameter is partitioned: its full size
                    total += n
                    trainable += n if p.requires_grad else 0
        return total, trainable

    from .models.loading import layer_list

    total, trainable = count(model.modules())
    found = layer_list(inner)
    layers = found[1] if found else []
    lowest = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                  len(layers))
    below = sum(count(layer.modules())[0] for layer in layers[:lowest])
    return total, trainable, total - below


def train_flops_per_token(model: torch.nn.Module) -> float:
    total, trainable, backward = linear_params(model)
    return 2.0 * total + 2.0 * backward + 2.0 * trainable

"""An exponential moving average of the actor's weights, kept apart from training and saved as its own model."""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import TrainConfig
from ...engine import distributed as D
from ...engine.backend import TrainEngine
from ...engine.weights import gathered_weights


class ActorEMA:
    """ema ← decay·ema + (1 − decay)·θ after every PPO step, over the full weights (LoRA merged), in fp32
    on rank 0's CPU (the other processes hold nothing)."""

    def __init__(self, decay: float, engine: TrainEngine, t: TrainConfig):
        self.decay = decay
        self._t = t
        self.weights = gathered_weights(engine, t, prefix="lm.", merge=True)

    @torch.no_grad()
    def update(self, engine: TrainEngine) -> None:
        current = gathered_weights(engine, self._t, prefix="lm.", merge=True)
        if current is None:
            return
        for name, w in self.weights.items():
            w.mul_(self.decay).add_(current[name].float(), alpha=1.0 - self.decay)

    def save(self, path: Path) -> None:
        if D.is_main():
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.weights.items()}, str(path))

    def load(self, path: Path) -> None:
        if D.is_main():
            from safetensors.torch import load_file

            self.weights = load_file(str(path))

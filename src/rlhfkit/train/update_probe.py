"""Whether an optimizer step reaches the weights the model computes with.

Trained in bf16 (DeepSpeed keeps fp32 master weights and a bf16 compute copy), an update smaller than half
a bf16 step of a weight (2^-9 of its size) leaves the compute copy as it was: forward passes and rollouts
do not see it until enough steps add up in the master copy. At a learning rate of 1e-5, Adam's updates
(about lr per element) stay below that for typical weights (|w| ≈ 0.02-0.05): a short bf16 run then hardly
learns although every master weight moved. The probe measures the share of compute-copy weights a step
changed, on a fixed sample of every trainable linear weight, and says so when most updates vanish.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SAMPLE = 4096  # elements per weight tensor (its first ones): cheap, and the same every step
# Under ZeRO-3 a process holds only a partition of each weight: the probe sees none and stays silent.
WARMUP = 3  # steps before judging (the first updates of Adam are larger than its later ones)
VANISHING = 0.25  # below this share of changed weights per step, the run "mostly does not learn"


class UpdateProbe:
    def __init__(self, name: str, module: torch.nn.Module, dtype: str):
        self.name, self.dtype = name, dtype
        # a ZeRO-3 parameter (ds_numel) is gathered only around forwards: its local tensor changes shape
        self.weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)
                        and m.weight.requires_grad and not hasattr(m.weight, "ds_numel")]
        self.snapshot: list[torch.Tensor] = []
        self.shares: list[float] = []
        self.warned = False

    def before(self) -> None:
        self.snapshot = [w.detach().reshape(-1)[:SAMPLE].clone() for w in self.weights]

    def after(self, step: int, say: Callable[[str], None]) -> dict:
        """{"precision/weights_changed": share of sampled compute-copy weights the step changed}; warns once
        when, after the warm-up, the mean share is below VANISHING in half precision."""
        if not self.snapshot:
            return {}
        changed = sum(int((w.detach().reshape(-1)[:SAMPLE] != s).sum()) for w, s in zip(self.weights, self.snapshot))
        share = changed / sum(s.numel() for s in self.snapshot)
        self.snapshot = []
        if changed == 0:  # no optimizer update this step (skipped, or every RL group dropped): nothing to judge
            return {}
        self.shares.append(share)
        recent = self.shares[WARMUP:]
        mean = sum(recent) / len(recent) if recent else 1.0
        if not self.warned and self.dtype != "float32" and mean < VANISHING:
            self.warned = True
            say(f"{self.name}: steps {WARMUP + 1}-{step}: only {100 * mean:.1f}% of the {self.dtype} compute copy's "
                f"weights changed per step: most updates are below {self.dtype}'s resolution at this learning "
                f"rate and the model barely learns. Train in float32 ({self.name}.dtype: float32), with LoRA, "
                f"or with a higher learning rate.")
        return {"precision/weights_changed": share}

    def summary(self) -> dict:
        if not self.shares:
            return {}
        return {"weights_changed_mean": sum(self.shares) / len(self.shares), "updates_vanish": self.warned}

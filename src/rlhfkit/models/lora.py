"""LoRA / QLoRA through peft, and merging LoRA weights into a plain state dict for export."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import LoraConfig

_LORA_KEY = re.compile(r"^(.*)\.lora_([AB])\.[^.]+\.weight$")


def apply_lora(model: nn.Module, cfg: LoraConfig, layers: tuple[str, list[int]] | None = None) -> nn.Module:
    """Wrap `model` with LoRA adapters on cfg.target_modules; with layers = (the layer list's name, indices),
    only in those transformer layers. The rest is frozen when only_optimize_lora."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if cfg.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none",
                              layers_pattern=layers and layers[0], layers_to_transform=layers and layers[1])
    wrapped = get_peft_model(model, peft_cfg)
    if not cfg.only_optimize_lora:
        for name, p in wrapped.named_parameters():
            if "lora_" not in name and p.is_floating_point():
                p.requires_grad_(True)
    return wrapped


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft state dict (base_layer + lora_A/B) → plain model state dict with W' = W + scaling·B·A.

    Works on a gathered state dict, so it never has to modify a model that is still training.
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _LORA_KEY.match(key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif ".lora_" not in key:
            plain[key.replace(".base_layer.", ".")] = value
    for module, ab in lora.items():
        w = plain[f"{module}.weight"]
        delta = (ab["B"].float() @ ab["A"].float()) * scaling
        plain[f"{module}.weight"] = (w.float() + delta).to(w.dtype)
    return {_strip_peft_prefix(k): v for k, v in plain.items()}


def _strip_peft_prefix(key: str) -> str:
    # peft nests the wrapped model as base_model.model.*, also when it wraps a submodule (backbone.base_model.model.*)
    return key.replace("base_model.model.", "")

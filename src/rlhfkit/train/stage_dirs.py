"""Where each supervised stage writes, and the model DPO starts from: what a stage needs to know about another
stage's output without importing that stage."""

from __future__ import annotations

from pathlib import Path

from ..config import Config


def sft_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "sft"


def rm_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "rm"


def dpo_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "dpo"


def dpo_start_model(cfg: Config) -> str:
    """dpo.model if given, else the SFT stage's final model when it exists, else the base model."""
    if cfg.dpo.model:
        return cfg.dpo.model
    sft_final = sft_stage_dir(cfg) / "final"
    return str(sft_final) if (sft_final / "config.json").is_file() else cfg.model.name_or_path

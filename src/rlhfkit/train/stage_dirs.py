"""Where each supervised stage writes: what a stage needs to know about another stage's output without
importing that stage."""

from __future__ import annotations

from pathlib import Path

from ..config import Config


def sft_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "sft"


def rm_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "rm"


def dpo_stage_dir(cfg: Config) -> Path:
    return cfg.output_dir / "dpo"


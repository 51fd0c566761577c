"""Which model RL (and DPO) starts from when the config names none: the SFT stage's output in a run that has SFT data,
else the base model (`model.name_or_path`), so RL can start straight from a model (the GSM8K recipe).

The rule reads the config only (never whether some directory happens to exist), so `rlhfkit pipeline`, a
stage run alone and the resume fingerprint agree on it.
"""

from __future__ import annotations

from ..config import Config


def sft_datasets(cfg: Config) -> list[str]:
    """The datasets that give phase 1 (SFT) records: those whose phases include 1, with a phase-1 share
    (`data.phase_ratios[0]`) where they feed several phases. A dataset with neither `phases:` nor `format:`
    has its format detected from its first record, as preparing it does."""
    from ..data.prepare import FORMAT_PHASES, Source

    names = []
    for ds in cfg.data.datasets:
        phases = ds.phases or FORMAT_PHASES[ds.format or Source(ds).format]
        if 1 in phases and (len(phases) == 1 or cfg.data.phase_ratios[0] > 0):
            names.append(ds.name)
    return names


def sft_skip_reason(cfg: Config) -> str | None:
    """Why this run has no SFT stage (None: it has one): nothing would read its output, or it has no data."""
    if cfg.pipeline.alignment == "ppo" and cfg.ppo.actor_model:
        return f"ppo.actor_model is set: RL starts from {cfg.ppo.actor_model}"
    if cfg.pipeline.alignment == "dpo" and cfg.dpo.model:
        return f"dpo.model is set: DPO starts from {cfg.dpo.model}"
    if not sft_datasets(cfg):
        return (f"no dataset feeds phase 1 (SFT data; data.phase_ratios {list(cfg.data.phase_ratios)}): "
                f"{cfg.pipeline.alignment.upper()} starts from model.name_or_path ({cfg.model.name_or_path})")
    return None


def actor_source(cfg: Config) -> str:
    """ppo.actor_model, else the SFT stage's final model in a run with SFT data, else model.name_or_path."""
    from .stage_dirs import sft_stage_dir

    if cfg.ppo.actor_model:
        return cfg.ppo.actor_model
    return str(sft_stage_dir(cfg) / "final") if sft_datasets(cfg) else cfg.model.name_or_path


def dpo_start_model(cfg: Config) -> str:
    """dpo.model, else the SFT stage's final model (which must exist) in a run with SFT data, else
    model.name_or_path: the same rule as RL's, read from the config and not from which directories exist."""
    from ..errors import ConfigError
    from .stage_dirs import sft_stage_dir

    if cfg.dpo.model:
        return cfg.dpo.model
    if not sft_datasets(cfg):
        return cfg.model.name_or_path
    sft_final = sft_stage_dir(cfg) / "final"
    if not (sft_final / "config.json").is_file():
        raise ConfigError(f"DPO needs {sft_final} (run `rlhfkit sft` first) or `dpo.model` in the config")
    return str(sft_final)

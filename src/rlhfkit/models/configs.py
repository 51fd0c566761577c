"""Which config describes a model: rlhfkit's model section for another model (a stage's output, the RM), and
the transformers config of a loaded model (through a peft wrapper, without quantization settings)."""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import Config, ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def model_config_for(cfg: Config, name_or_path: str | None) -> ModelConfig:
    """The model section for another model (a stage output, the RM): its own tokenizer where it has one,
    not `model.tokenizer`, so that a tokenizer mismatch between actor and RM is seen rather than hidden;
    a model dir that ships none is taken to use the run's."""
    if name_or_path is None or name_or_path == cfg.model.name_or_path:
        return cfg.model
    own = Path(name_or_path)
    has_tokenizer = not own.is_dir() or any((own / f).is_file() for f in TOKENIZER_FILES)
    return cfg.model.model_copy(update={"name_or_path": name_or_path, "revision": None,
                                        "tokenizer": None if has_tokenizer else cfg.model.tokenizer or cfg.model.name_or_path})


def dense_config(config):
    """A copy of a model config without its quantization settings (QLoRA exports and copies are dense)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def base_config(module):
    """The transformers config of a model, through a peft wrapper if there is one."""
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    return inner.config

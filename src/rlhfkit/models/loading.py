"""One way to get a causal LM and its tokenizer: local HF dir, hub id, or built-in name.

Only safetensors weights are loaded, and remote code runs only when the config says so.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from ..config import ModelConfig
from ..errors import ModelLoadError
from .builtin import BUILTIN_NAMES, materialize_builtin

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_HOST = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]


def resolve_model_dir(name_or_path: str, cfg: ModelConfig | None = None, revision: str | None = None) -> str:
    """A local directory (or, for a reachable hub, the hub id itself) that from_pretrained can read."""
    if name_or_path in BUILTIN_NAMES:
        return str(materialize_builtin(name_or_path, cfg.tiny if cfg else None))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but holds no config.json or tokenizer_config.json")
        return str(path)
    if not _HUB_ID.match(name_or_path):  # `name` or `org/name`: never ./x, /x or ~/x
        raise ModelLoadError(f"model path not found: {name_or_path} (not a directory, a built-in {BUILTIN_NAMES}, or a hub id)")
    if _in_hub_cache(name_or_path, revision):
        return name_or_path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: it is not a local directory, not in the Hugging Face cache, and the hub "
            f"({_HUB_HOST}) is unreachable. On a machine with access run "
            f"`huggingface-cli download {name_or_path} --local-dir DIR`, copy DIR here and set "
            f"model.name_or_path to DIR (or use the built-in 'smollm2-135m-instruct')."
        )
    return name_or_path


def missing_local_model(name_or_path: str) -> bool:
    """True where `name_or_path` can only be a local directory (not a built-in, not shaped like a hub id) and
    none is there: what a config check can say without loading anything."""
    if name_or_path in BUILTIN_NAMES or Path(name_or_path).expanduser().is_dir():
        return False
    return not _HUB_ID.match(name_or_path)


def model_file(name_or_path: str, filename: str, revision: str | None = None) -> Path | None:
    """One small file of a model (config.json, tokenizer.json) without loading it: from a local directory, the
    Hugging Face cache, or the hub when it is reachable; None where none of them has it (built-ins included)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or name_or_path in BUILTIN_NAMES or not _HUB_ID.match(name_or_path):
        return path / filename if path.is_dir() and (path / filename).is_file() else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        hit = try_to_load_from_cache(name_or_path, filename, revision=revision)
        if isinstance(hit, str):
            return Path(hit)
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            return None
        return Path(hf_hub_download(name_or_path, filename, revision=revision))
    except (OSError, ValueError):  # a private or missing repo, a file the repo lacks: nothing to read here
        return None


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        return isinstance(hit, str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick DNS + TCP probe, so an offline machine fails in seconds instead of a minute of retries."""
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = resolve_model_dir(cfg.tokenizer or cfg.name_or_path, cfg, cfg.revision)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {source}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer from {source} has no EOS token; set data.eos_token")
    if tok.pad_token_id is None:
        # Masks come from lengths, never from pad ids, so any id works as padding; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig, dtype: str | None = None, **extra):
    """from_pretrained at `dtype` (default: model.dtype; `auto` resolved for this machine). Loading at a
    half precision casts the weights only; buffers such as rotary frequencies stay fp32."""
    from transformers import AutoModelForCausalLM

    from ..engine.precision import torch_dtype

    source = resolve_model_dir(cfg.name_or_path, cfg, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=cfg.revision,
            dtype=torch_dtype(dtype or cfg.dtype, "model.dtype"),
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            **extra,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a causal LM from {source}: {e}") from None
    return model


def load_model_and_tokenizer(cfg: ModelConfig, dtype: str | None = None):
    return load_causal_lm(cfg, dtype), load_tokenizer(cfg)


def layer_list(model):
    """(module name, the transformer's ModuleList of config.num_hidden_layers layers), or None."""
    from torch import nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n),
                None)


def set_dropout(model, p: float) -> None:
    """Override every dropout of a model (config fields and nn.Dropout modules), e.g. 0 for RLHF stages."""
    from torch import nn

    config = getattr(model, "config", None)
    if config is not None:
        for key in list(vars(config)):
            if "dropout" in key and isinstance(getattr(config, key), float):
                setattr(config, key, p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        # OPT and others keep plain float rates read at each forward (F.dropout(x, p=self.dropout))
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)

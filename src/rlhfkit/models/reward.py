"""Reward model / critic: a transformer backbone plus a scalar value head.

`values()` gives one value per token (the critic uses all of them); `score()` reads the value at the last
real token of each row through `gather_last`, the project's one definition of where a score lives.
Saved as an HF backbone directory plus value_head.safetensors and reward_stats.json (the score mean/std
on the RM's training data, for reference). The head has no bias, except a critic's head after
`normalize_head` (PPO with normalised scores); a saved bias is loaded back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..sequences import gather_last, length_mask
from .finite import require_finite_weights

HEAD_FILE = "value_head.safetensors"
STATS_FILE = "reward_stats.json"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.v_head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        nn.init.normal_(self.v_head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        self.score_mean, self.score_std = 0.0, 1.0

    def values(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = length_mask(lengths, input_ids.shape[1]).long()
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, lengths: torch.Tensor, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
        """[B] score at the last real token. prompt_lens is accepted (and not needed) so that PPO calls every
        reward module the same way."""
        return gather_last(self.values(input_ids, lengths), lengths)

    forward = score

    @torch.no_grad()
    def normalize_head(self, mean: float, std: float) -> None:
        """Make every value (s − mean) / std of what it was: the head's weight divided by std and a bias
        (b − mean) / std, added if the head has none. PPO's critic starts as the RM this way, in the
        normalised scale its returns live in."""
        old = self.v_head
        head = nn.Linear(old.in_features, 1, bias=True).to(old.weight.dtype)
        head.weight.copy_(old.weight / std)
        head.bias.copy_(((old.bias if old.bias is not None else 0.0) - mean) / std)
        self.v_head = head
        self.score_mean, self.score_std = 0.0, 1.0

    def gradient_checkpointing_enable(self, **kw):
        self.backbone.gradient_checkpointing_enable(**kw)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, **kw) -> "RewardModel":
        """From a saved reward model (head included) or from any causal-LM directory (fresh head)."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw)
        model = cls(backbone)
        head = Path(path) / HEAD_FILE
        if head.is_file():
            weights = load_file(head)
            if "bias" in weights:
                model.v_head = nn.Linear(backbone.config.hidden_size, 1, bias=True)
            model.v_head.load_state_dict(weights)
            stats = json.loads((Path(path) / STATS_FILE).read_text()) if (Path(path) / STATS_FILE).is_file() else {}
            model.score_mean, model.score_std = stats.get("score_mean", 0.0), stats.get("score_std", 1.0)
        model.v_head.to(dtype)
        return model

    @staticmethod
    def save(out: Path, state_dict: dict[str, torch.Tensor], config, score_mean: float, score_std: float) -> None:
        """Write backbone (HF format) + head + stats from a full state dict (as gathered from any ZeRO stage);
        weights with NaN/inf in them are refused before anything is written."""
        from transformers import AutoModel

        require_finite_weights(state_dict, str(out))
        out = Path(out)
        backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        head_sd = {k[len("v_head."):]: v.contiguous() for k, v in state_dict.items() if k.startswith("v_head.")}
        with torch.device("meta"):
            shell = AutoModel.from_config(config)
        shell.save_pretrained(out, state_dict=backbone_sd, safe_serialization=True)
        save_file(head_sd, str(out / HEAD_FILE))
        (out / STATS_FILE).write_text(json.dumps({"score_mean": score_mean, "score_std": score_std}))

"""The four PPO models. Actor and critic train through the shared backend (TrainEngine); reference and
reward are frozen and only run forward, each at its own precision and ZeRO placement.

Every model reads the same right-padded layout (prompt then response, masks from lengths), so the
reward and the critic go through RewardModel's one score position (GUIDE §2) unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ...engine.backend import param_groups
from ...errors import ConfigError
from ...models.configs import model_config_for
from ...models.lora import apply_lora
from ...models.loading import load_causal_lm, load_tokenizer, set_dropout
from ...models.reward import RewardModel
from ...rollout.scoring import FrozenModel, load_reward_model, tokenizer_pair
from ..common import TokenLogprobLM, trainable_causal_lm
from ..stage_dirs import rm_stage_dir, sft_stage_dir
from ..starts import actor_source


class ValueModel(nn.Module):
    """The critic as the backend trains it: forward gives one value per token (a RewardModel's values)."""

    def __init__(self, rm: RewardModel):
        super().__init__()
        self.rm = rm

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.rm.values(input_ids, lengths)

    def gradient_checkpointing_enable(self, **kw):
        self.rm.gradient_checkpointing_enable(**kw)


def actor_start(cfg: Config) -> str:
    """ppo.actor_model, else the SFT stage's final model (which must exist) in a run with SFT data, else
    model.name_or_path (train/starts.py)."""
    source = actor_source(cfg)
    if source == str(sft_stage_dir(cfg) / "final"):
        return _stage_output(sft_stage_dir(cfg) / "final", "ppo.actor_model", "rlhfkit sft")
    return source


def reward_start(cfg: Config) -> str:
    if cfg.ppo.reward_model:
        return cfg.ppo.reward_model
    return _stage_output(rm_stage_dir(cfg) / "final", "ppo.reward_model", "rlhfkit rm")


def _stage_output(path: Path, key: str, command: str) -> str:
    if not (path / "config.json").is_file():
        raise ConfigError(f"PPO needs {path} (run `{command}` first) or `{key}` in the config")
    return str(path)


def build_actor(cfg: Config, t) -> tuple[TokenLogprobLM, list[dict]]:
    return trainable_causal_lm(model_config_for(cfg, actor_start(cfg)), t)


def critic_head(score_stats: tuple[float, float] | None, model_weight: float = 1.0,
                text_mean: float = 0.0) -> tuple[float, float]:
    """(a, b): the critic, the RM's score s rescaled to a·s + b, starts in the scale of PPO's returns, the
    reward as RewardSum sums it: model_weight·(s − mean)/std (model_weight·s without normalisation) plus
    text_mean, the text sources' weighted mean on the initial policy's samples (0 when not measured)."""
    if score_stats is None:
        return model_weight, text_mean
    a = model_weight / score_stats[1]
    return a, text_mean - a * score_stats[0]


def build_critic(cfg: Config, t, score_stats: tuple[float, float] | None = None, model_weight: float = 1.0,
                 text_mean: float = 0.0) -> tuple[ValueModel, list[dict]]:
    """The critic starts as the reward model (value head included), as in InstructGPT, its head rescaled to
    the scale its returns live in (critic_head: the model source's weight, the normalisation by score_stats,
    the text sources' mean); a critic_model other than the reward model keeps its own head."""
    rm = load_reward_model(cfg.ppo.critic_model or reward_start(cfg), cfg)
    head = critic_head(score_stats, model_weight, text_mean)
    if head != (1.0, 0.0) and cfg.ppo.critic_model in (None, cfg.ppo.reward_model):
        rescale_head(rm, *head)
    if t.dropout is not None:
        set_dropout(rm.backbone, t.dropout)
    if t.lora.enabled:
        rm.backbone = apply_lora(rm.backbone, t.lora)  # the value head stays fully trainable
    model = ValueModel(rm)
    return model, param_groups(model, t.learning_rate, t.weight_decay, {"lora_": t.lora.learning_rate})


@torch.no_grad()
def rescale_head(rm: RewardModel, a: float, b: float) -> None:
    """Make every value a·v + b of what it was (the head gets a bias if it had none)."""
    rm.normalize_head(0.0, 1.0)  # the same values, from a head with a bias
    rm.v_head.weight.mul_(a)
    rm.v_head.bias.mul_(a).add_(b)


def build_reference(cfg: Config) -> FrozenModel:
    lm = load_causal_lm(model_config_for(cfg, actor_start(cfg)), dtype="float32")
    return FrozenModel(TokenLogprobLM(lm), cfg.ppo.reference)


def build_reward(cfg: Config) -> FrozenModel:
    return FrozenModel(load_reward_model(reward_start(cfg), cfg), cfg.ppo.reward)


def check_tokenizers(cfg: Config):
    """Actor and reward tokenizers must agree token for token unless ppo.retokenize says to re-encode text.

    Returns the (actor, reward model) tokenizer pair when it must retokenize, else None."""
    actor_tok = load_tokenizer(model_config_for(cfg, actor_start(cfg)))
    return tokenizer_pair(cfg, actor_tok, f"the actor ({actor_start(cfg)})", reward_start(cfg), "the reward model")

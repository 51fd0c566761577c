"""Stage 2, reward model: backbone + scalar head, Bradley–Terry loss on phase-2 pairs.

The score is read at the last response token (models.reward.RewardModel.score → sequences.gather_last).
Eval reports accuracy, mean margin and chosen/rejected score means before, during and after training.
Every saved model stores the mean/std of the scores of each process's last STATS_ROWS training pairs beside
it, for reference only (nothing computes with them: PPO normalises with its own policy's samples,
ppo.normalize_scores). They are the scores the training forwards computed anyway, so a checkpoint costs no
scoring pass; a run resumed at its last step, which has none, scores the first STATS_ROWS training pairs
instead (so the stored figures of a resumed run can differ slightly from an uninterrupted one's).
"""

from __future__ import annotations

import torch

from ..config import Config
from ..errors import ConfigError
from ..engine import distributed as D
from ..engine.backend import param_groups
from ..engine.sharding import equal_count_batches
from ..engine.weights import gathered_weights
from ..models.configs import base_config, model_config_for
from ..models.lora import apply_lora
from ..models.loading import layer_list, load_tokenizer, resolve_model_dir, set_dropout
from ..models.reward import RewardModel
from .batching import collate_pairs
from .common import begin_stage, pair_stage, stage_data
from .budget import StageBudget
from .loop import run_stage
from .losses import bradley_terry_loss, pair_metrics
from .packing import pair_inputs, require_isolated_packing
from .stage_dirs import rm_stage_dir

STATS_ROWS = 128  # training pairs whose scores give the stored mean/std (256 scores)


class PackableRewardModel(RewardModel):
    """The reward model as this stage trains it: its forward also scores packed rows (train/packing.py)."""

    def forward(self, input_ids, lengths=None, prompt_lens=None, position_ids=None, ends=None, attention_mask=None):
        """score(input_ids, lengths) of padded rows; of packed pair rows (position_ids [R, W], attention_mask
        [R, 1, W, W]: collate_pairs_packed), the score of each sequence at its last token ends[i] = (row, column): [S]."""
        if position_ids is None:
            return self.score(input_ids, lengths, prompt_lens)
        layout = pair_inputs(self.backbone, position_ids, attention_mask)
        hidden = self.backbone(input_ids=input_ids, **layout).last_hidden_state
        last = hidden[ends[:, 0], ends[:, 1]]
        return self.v_head(last.to(self.v_head.weight.dtype)).squeeze(-1).float()


def build_reward_model(cfg: Config) -> tuple[RewardModel, list[dict]]:
    t = cfg.rm
    mcfg = model_config_for(cfg, t.model)
    path = resolve_model_dir(mcfg.name_or_path, mcfg, mcfg.revision)
    model = PackableRewardModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=mcfg.trust_remote_code)
    if t.dropout is not None:
        set_dropout(model.backbone, t.dropout)
    adapted = None  # LoRA's layers: all, or (list name, indices) those above rm.freeze_layers
    if t.freeze_layers:
        name, layers = freeze_lower_layers(model.backbone, t.freeze_layers)
        adapted = (name.rsplit(".", 1)[-1], list(range(t.freeze_layers, layers)))
        if t.lora.enabled and not adapted[1]:
            raise ConfigError(f"rm.freeze_layers {t.freeze_layers} leaves none of the model's {layers} layers "
                              "for rm.lora's adapters")
    if t.lora.enabled:
        model.backbone = apply_lora(model.backbone, t.lora, adapted)  # the head stays fully trainable
    lrs = {"lora_": t.lora.learning_rate, "v_head.": t.head_learning_rate}
    return model, param_groups(model, t.learning_rate, t.weight_decay, lrs)


def freeze_lower_layers(backbone: torch.nn.Module, n: int) -> tuple[str, int]:
    """Fix the input embeddings and the lowest n transformer layers (no gradient, no optimizer state).
    Returns the layer list's module name and the model's number of layers."""
    name, layers = layer_list(backbone) or ("", None)
    if layers is None or n > len(layers):
        have = "no layer list" if layers is None else f"{len(layers)} layers"
        raise ConfigError(f"rm.freeze_layers {n}: the model has {have}")
    for module in (backbone.get_input_embeddings(), *layers[:n]):
        module.requires_grad_(False)
    return name, len(layers)


def pair_scores(forward, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and of the rejected sequences of a padded (collate_pairs) or packed
    (collate_pairs_packed) batch. forward: the engine or a PackableRewardModel."""
    ids = batch["input_ids"].to(device)
    if "position_ids" in batch:
        scores = forward(ids, position_ids=batch["position_ids"].to(device), ends=batch["ends"].to(device),
                         attention_mask=batch["attention_mask"].to(device))
    else:
        scores = forward(ids, batch["lengths"].to(device))
    half = scores.shape[0] // 2
    return scores[:half].float(), scores[half:].float()


def run_rm(cfg: Config, show_progress: bool = True, budget: StageBudget | None = None) -> dict:
    out_dir = rm_stage_dir(cfg)
    cfg = begin_stage(cfg, out_dir, "rm")
    t = cfg.rm
    train, evals, pad_id = stage_data(cfg, 2, show_progress)
    tokenizer = load_tokenizer(model_config_for(cfg, t.model))
    model, groups = build_reward_model(cfg)
    packing = t.packing
    if packing:
        require_isolated_packing(model.backbone, "rm.packing", pairs=True)

    recent = ScoreWindow(2 * STATS_ROWS)

    def loss(engine, batch):
        chosen, rejected = pair_scores(engine, batch, engine.device)
        if engine.module.training:
            recent.add(torch.cat([chosen, rejected]))
        n = chosen.shape[0]
        metrics = pair_metrics(chosen.detach(), rejected.detach())
        return bradley_terry_loss(chosen, rejected, t.margin, t.center_coef) * n, {k: v * n for k, v in metrics.items()}

    def export(engine, out):
        mean, std = recent.stats() or score_stats(engine, train, pad_id, t.micro_batch_size)
        sd = gathered_weights(engine, t)
        if D.is_main():
            RewardModel.save(out, sd, base_config(engine.module.backbone), mean, std)
            tokenizer.save_pretrained(out)

    stage = pair_stage("rm", train, evals, pad_id, loss, export,
                       ("accuracy", "margin", "chosen_score", "rejected_score"), packing)
    return run_stage(stage, t, model, groups, out_dir, show_progress, cfg.model_dump(mode="json"), budget)


class ScoreWindow:
    """The last `size` training scores of this process; stats() reduces them over every process (all call it)."""

    def __init__(self, size: int):
        self.size, self.scores = size, torch.zeros(0, dtype=torch.float64)

    def add(self, scores: torch.Tensor) -> None:
        self.scores = torch.cat([self.scores, scores.detach().double().cpu()])[-self.size:]

    def stats(self) -> tuple[float, float] | None:
        """(mean, std) over every process's window, or None while they hold under half a window."""
        x = self.scores
        s, s2, n = D.all_reduce_sum([float(x.sum()), float((x ** 2).sum()), float(x.numel())])
        return None if n < self.size // 2 else mean_std(s, s2, n)


@torch.no_grad()
def score_stats(engine, train, pad_id: int, micro: int) -> tuple[float, float]:
    """Mean and std of the scores of chosen and rejected responses over the first STATS_ROWS training pairs.

    Every process runs the same number of forwards (equal_count_batches), or ZeRO-3 would hang."""
    engine.eval()
    rank, world = D.init_distributed()
    s = s2 = n = 0.0
    for rows, keep in equal_count_batches(min(len(train), STATS_ROWS), rank, world, micro):
        chosen, rejected = pair_scores(engine, collate_pairs([train.row(int(j)) for j in rows], pad_id), engine.device)
        if keep:
            both = torch.cat([chosen, rejected]).double()
            s, s2, n = s + both.sum().item(), s2 + (both ** 2).sum().item(), n + both.numel()
    s, s2, n = D.all_reduce_sum([s, s2, n])
    engine.train()
    return mean_std(s, s2, n)


def mean_std(s: float, s2: float, n: float) -> tuple[float, float]:
    """Mean and (population) std from a sum, a sum of squares and a count."""
    mean = s / max(n, 1)
    return mean, max(s2 / max(n, 1) - mean ** 2, 0.0) ** 0.5

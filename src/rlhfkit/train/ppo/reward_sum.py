"""The RL reward of a batch of rollouts: the weighted sum of ppo.reward.sources, each also kept apart so
it can be logged as reward/<name>.

The `model` source is the trained reward model on the token sequences (re-tokenized when its tokenizer
differs); with ppo.normalize_scores its score is normalised by the initial policy's statistics before it
is weighted. Every other source (verifiers, Python functions, a remote server: rlhfkit.rewards) reads the
decoded prompt and response texts and the prompt records' metadata. In multi-turn episodes the response
is the whole episode after the prompt (the model's turns and what tools or the environment added), and an
environment's per-episode reward is one more source, `environment`.
"""

from __future__ import annotations

import torch

from ...engine import distributed as D
from ...errors import RlhfkitError
from ...rollout.sampling import Rollout, select_rows
from ...rollout.scoring import RewardScorer

MODEL = "model"  # the name of the reward model's source
ENVIRONMENT = "environment"  # the name of an environment's per-episode reward


class RewardFailed(RlhfkitError):
    """A text source failed on some process; raised on every process, so that all stop together."""


class RewardSum:
    def __init__(self, model_scorer: RewardScorer | None, model_weight: float, text_sources: list, tokenizer,
                 environment_weight: float | None = None):
        self.model_scorer, self.model_weight = model_scorer, model_weight
        self.text_sources, self.tokenizer = text_sources, tokenizer
        self.environment_weight = environment_weight  # None: no environment
        self.score_stats: tuple[float, float] | None = None  # (mean, std) the model's scores are normalised by

    @property
    def names(self) -> list[str]:
        return (([MODEL] if self.model_scorer else []) + [s.name for s in self.text_sources]
                + ([ENVIRONMENT] if self.environment_weight is not None else []))

    @torch.no_grad()
    def model_scores(self, r: Rollout, micro_batch: int, device) -> torch.Tensor:
        """[B] raw reward-model scores, micro-batch by micro-batch (every process runs as many forwards
        as its rows need; callers keep row counts equal across processes for ZeRO-3)."""
        parts = []
        for start in range(0, len(r.lengths), micro_batch):
            sub = select_rows(r, torch.arange(start, min(start + micro_batch, len(r.lengths)))).to(device)
            parts.append(self.model_scorer(sub).cpu())
        return torch.cat(parts) if parts else torch.zeros(0)

    def texts(self, r: Rollout) -> tuple[list[str], list[str]]:
        """Decoded prompts (as rendered, special tokens kept) and responses (special tokens dropped)."""
        prompts, responses = [], []
        for i in range(len(r.lengths)):
            pl, n = int(r.prompt_lens[i]), int(r.lengths[i])
            ids = r.input_ids[i]
            prompts.append(self.tokenizer.decode(ids[:pl]))
            responses.append(self.tokenizer.decode(ids[pl:n], skip_special_tokens=True))
        return prompts, responses

    def per_source(self, r: Rollout, metadata: list[dict], micro_batch: int, device,
                   environment: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{source name: [B] raw reward} for every source; `environment`: the episodes' rewards from the
        environment (when there is one)."""
        out = {}
        if self.model_scorer is not None:
            out[MODEL] = self.model_scores(r, micro_batch, device).float()
        if self.text_sources:
            from ...rewards.sources import RewardError, generated_texts

            prompts, responses = self.texts(r)
            generated = generated_texts(self.tokenizer, r)  # special tokens kept, as a remote server reads them
            problem = None
            try:
                for source in self.text_sources:
                    out[source.name] = torch.tensor(source(prompts, responses, metadata, generated),
                                                    dtype=torch.float32)
            except RewardError as e:
                problem = str(e)
            # every process learns of a failure anywhere: the others would wait in the next collective
            failed = D.all_reduce_sum([float(problem is not None)])[0]
            if failed:
                raise RewardFailed(problem or f"a reward source failed on {int(failed)} other process(es)")
        if self.environment_weight is not None:
            out[ENVIRONMENT] = environment.float()
        return out

    def total(self, per_source: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Σ weight · reward; the model's score normalised first when score_stats are set and normalize."""
        total = None
        for name, values in per_source.items():
            if name == MODEL:
                if normalize and self.score_stats is not None:
                    values = (values - self.score_stats[0]) / self.score_stats[1]
                term = self.model_weight * values
            else:
                term = self._weights[name] * values
            total = term if total is None else total + term
        return total

    @property
    def _weights(self) -> dict[str, float]:
        return {ENVIRONMENT: self.environment_weight, **{s.name: s.weight for s in self.text_sources}}

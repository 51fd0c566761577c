"""Typed run configuration: one YAML recipe per run, plus dotted command-line overrides.

    rlhfkit data prepare configs/quickstart.yaml data.max_seq_len=256

Every section forbids unknown keys, so a typo is an error naming the key and the file, never a
silently ignored setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# auto: bf16 where the hardware runs it natively, fp16 on GPUs without bf16, fp32 elsewhere
# (engine/precision.py); resolved once per stage and saved in the resolved config.
Precision = Literal["auto", "float32", "bfloat16", "float16"]
# The decoding loop of rollouts and eval answers (engine/generation.py): auto, dynamic, static or compiled
Decoding = Literal["auto", "dynamic", "static", "compiled"]


class TinyModelConfig(Section):
    """A small random Llama for tests: vocab ~1000, 2 layers, loads in milliseconds."""

    vocab_size: int = Field(1000, ge=300)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(1024, ge=16)
    chat_template: bool = True
    seed: int = 0


class ModelConfig(Section):
    # A local HF directory, a hub id, or a built-in name: "smollm2-135m-instruct" (the embedded GGUF)
    # or "tiny-random" (built from `tiny`).
    name_or_path: str = "smollm2-135m-instruct"
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None
    dtype: Precision = "auto"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


DatasetFormat = Literal["preference", "sft", "prompt"]


class DatasetConfig(Section):
    """One dataset of the blend: a registry name (hub) or a local file in the uniform format."""

    name: str
    path: str | None = None  # local json / jsonl / jsonl.gz / parquet; its records are the train split
    eval_path: str | None = None  # local eval split; without one, `data.eval_fraction` is carved out
    format: DatasetFormat | None = None  # local files: detected from the first record when omitted
    phases: list[Literal[1, 2, 3]] | None = None  # restrict the phases this dataset feeds
    max_records: int | None = Field(None, ge=1)  # keep only the first N valid records (quick runs)

    @field_validator("phases")
    @classmethod
    def _phases_unique(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must list each phase 1, 2, 3 at most once, and at least one")
        return v


class DataConfig(Section):
    datasets: list[DatasetConfig] = Field(min_length=1)
    # Share of each dataset given to phase 1 (SFT), 2 (reward model), 3 (PPO), as in DeepSpeed-Chat.
    phase_ratios: tuple[float, float, float] = (2.0, 4.0, 4.0)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_eval_records: int | None = Field(None, ge=1)  # per dataset, after carving
    seed: int = 1234
    max_seq_len: int = Field(512, ge=8)
    max_prompt_len: int = Field(256, ge=4)
    overlong: Literal["truncate", "drop"] = "truncate"
    template: Literal["auto", "plain"] = "auto"  # auto: the tokenizer's chat template where it has one
    eos_token: str | None = None  # defaults to the tokenizer's EOS; must be a single token
    # A system turn put before every prompt that has none (e.g. how to format the final answer); with a
    # chat template it replaces the template's default system prompt
    system_prompt: str | None = None
    on_bad_record: Literal["skip", "error"] = "skip"
    cache_dir: str | None = None  # default: <user cache>/rlhfkit/data

    @field_validator("phase_ratios")
    @classmethod
    def _ratios(cls, v):
        if any(r < 0 for r in v):
            raise ValueError(f"ratios must not be negative, got {list(v)}")
        if sum(v) <= 0:
            raise ValueError(f"at least one ratio must be positive, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_len > self.max_seq_len - 2:
            raise ValueError(
                f"max_prompt_len ({self.max_prompt_len}) must leave room for a response: "
                f"at most max_seq_len - 2 = {self.max_seq_len - 2}"
            )
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique, repeated: {dupes}")
        return self


class LoraConfig(Section):
    """LoRA / QLoRA through peft. r = 0 turns it off."""

    r: int = Field(0, ge=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float | None = Field(None, gt=0)  # LoRA weights' own LR; default: the stage's LR
    only_optimize_lora: bool = True  # False: the rest of the model trains too (at the stage's LR)
    quantize_4bit: bool = False  # QLoRA: NF4 base weights through bitsandbytes
    save: Literal["merged", "adapter"] = "merged"

    @property
    def enabled(self) -> bool:
        return self.r > 0


class TrainConfig(Section):
    """How a stage steps its optimizer: the same keys for SFT, RM, DPO (and the PPO actor/critic)."""

    micro_batch_size: int = Field(4, ge=1)  # rows per forward pass on each process
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # used when warmup_steps is 0
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    dtype: Precision = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    dropout: float | None = Field(None, ge=0, lt=1)  # override the model's dropout (None: keep it)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    eval_every: int = Field(0, ge=0)  # steps; 0: only before and after training
    # false: no eval before the first step (a fresh reward head scores at chance: its "before" says nothing)
    eval_at_start: bool = True
    max_eval_batches: int | None = Field(None, ge=1)
    save_every: int = Field(0, ge=0)  # steps; 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    resume: Literal["auto", "never", "force"] = "auto"  # auto: continue from the latest intact checkpoint
    # made with the same settings; force: also under changed settings; never: start fresh
    # Optimizer steps with a non-finite loss or gradient norm that may be skipped (no update) before the run
    # stops; 0: the first one stops it.
    max_nonfinite_steps: int = Field(0, ge=0)
    seed: int = 42
    wandb_project: str | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class SFTConfig(TrainConfig):
    loss_on: Literal["response", "all"] = "response"  # response: prompt tokens are masked out of the loss
    learning_rate: float = Field(2e-5, gt=0)


class RewardConfig(TrainConfig):
    model: str | None = None  # backbone to start from; default: model.name_or_path
    margin: float = 0.0  # Bradley–Terry margin
    center_coef: float = Field(0.0, ge=0)  # weight of mean((r_c + r_r)^2), keeps scores centred
    learning_rate: float = Field(1e-5, gt=0)
    head_learning_rate: float | None = Field(None, gt=0)  # the freshly initialised value head; default: learning_rate
    # the embeddings and the lowest N transformer layers stay as loaded: the backward pass stops above them
    freeze_layers: int = Field(0, ge=0)


class DPOConfig(TrainConfig):
    model: str | None = None  # policy to start from; default: the SFT stage's output, else model.name_or_path
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # > 0: conservative DPO
    learning_rate: float = Field(1e-6, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)  # None: 0 in DPO (policy and reference), as TRL does


class FrozenModelConfig(Section):
    """A model PPO only runs forward (reference, reward): precision and placement, no optimizer."""

    dtype: Precision = "auto"  # auto: the actor's resolved precision, so step-0 KL is exactly 0
    zero_stage: Literal[0, 3] = 0  # 3: parameters partitioned over processes (gathered layer by layer)
    offload_param: bool = False  # ZeRO-3 only: keep the partitions in CPU memory

    @model_validator(mode="after")
    def _checks(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        return self


class SamplingSettings(Section):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    stop_ids: list[int] = Field(default_factory=list)  # stop tokens besides the tokenizer's EOS


class AdaptiveKLConfig(Section):
    target: float = Field(6.0, gt=0)  # KL per sequence (nats) to steer towards
    horizon: float = Field(10000, gt=0)  # in rollouts (sequences)


def _changed(section: Section, key: str) -> bool:
    """Whether `key` differs from its default: settings that would be ignored are errors when changed, while
    a resolved config, which writes every default out, still loads (a sub-section's dtype is resolved
    there, so it does not count)."""
    value, default = getattr(section, key), type(section).model_fields[key].get_default(call_default_factory=True)
    if isinstance(value, Section) and isinstance(default, Section):
        return value.model_dump(exclude={"dtype"}) != default.model_dump(exclude={"dtype"})
    return value != default


# TrainConfig keys an RL model section inherits but the RL loop decides for itself, with where to set them
RL_LOOP_KEYS = {"epochs": "ppo.steps", "max_steps": "ppo.steps", "eval_every": "ppo.eval_every",
                "max_eval_batches": "ppo.eval_prompts", "save_every": "ppo.save_every",
                "keep_checkpoints": "ppo.keep_checkpoints", "log_every": "nothing (every step is logged)",
                "eval_at_start": "nothing (RL evaluates its start once)", "resume": "ppo.resume",
                "seed": "ppo.seed", "wandb_project": "ppo.wandb_project",
                "gradient_accumulation_steps": "ppo.mini_batch_size (accumulation follows from it)"}


class ActorConfig(TrainConfig):
    """The PPO actor's backend settings. micro_batch_size also sizes the experience forward passes;
    gradient accumulation follows from ppo.mini_batch_size. The loop's own keys (RL_LOOP_KEYS) are errors
    here: the RL loop would not read them."""

    micro_batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "constant"
    dropout: float | None = Field(0.0, ge=0, lt=1)  # PPO ratios need the same network in rollout and update

    @model_validator(mode="after")
    def _loop_keys(self):
        for key in sorted(k for k in RL_LOOP_KEYS if _changed(self, k)):  # a saved config repeats the defaults
            raise ValueError(f"{key} is not read here: the RL loop sets it for actor and critic; use "
                             f"{RL_LOOP_KEYS[key]}")
        return self


class CriticConfig(ActorConfig):
    learning_rate: float = Field(5e-6, gt=0)


class _RewardSourceBase(Section):
    weight: float = 1.0  # the step's reward is the weighted sum of every source
    name: str | None = None  # logged as reward/<name>; default: the type (numbered when repeated)


class ModelRewardSource(_RewardSourceBase):
    """The trained reward model (ppo.reward_model, else the RM stage's output) on the token sequences."""

    type: Literal["model"] = "model"


class PythonRewardSource(_RewardSourceBase):
    """function(prompts, responses, metadata) -> floats, one per response; "package.module:function" or
    "path/to/file.py:function" (relative paths from the working directory)."""

    type: Literal["python"]
    function: str = Field(pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")


class Gsm8kRewardSource(_RewardSourceBase):
    """1 when the response's final number equals the record's reference answer (metadata[answer_key])."""

    type: Literal["gsm8k"]
    answer_key: str = "final_answer"


class ExactRewardSource(_RewardSourceBase):
    """1 when the response, stripped, equals metadata[answer_key] (stripped)."""

    type: Literal["exact"]
    answer_key: str = "answer"


class RegexRewardSource(_RewardSourceBase):
    """1 when the regex is found in the response (re.search)."""

    type: Literal["regex"]
    pattern: str


class FormatRewardSource(_RewardSourceBase):
    """1 when the response ends in the answer format; default: GSM8K's "#### <number>" line."""

    type: Literal["format"]
    pattern: str = r"####\s*-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*$"


class RemoteRewardSource(_RewardSourceBase):
    """An HTTP reward server speaking OpenRLHF's remote reward-model protocol (docs/rewards.md)."""

    type: Literal["remote"]
    url: str = Field(pattern=r"^https?://")
    timeout: float = Field(60.0, gt=0)  # seconds per request
    retries: int = Field(2, ge=0)  # further tries after a failed request, with backoff
    batch_size: int = Field(64, ge=1)  # responses per request
    label_key: str | None = None  # the records' metadata field sent as the protocol's "labels"


RewardSource = Annotated[ModelRewardSource | PythonRewardSource | Gsm8kRewardSource | ExactRewardSource
                         | RegexRewardSource | FormatRewardSource | RemoteRewardSource, Field(discriminator="type")]


class PPORewardConfig(FrozenModelConfig):
    """Where the RL reward comes from: a weighted sum of sources, each logged as reward/<name>. The
    placement keys (dtype, zero_stage, offload_param) are the reward model's, used when a `model` source is."""

    sources: list[RewardSource] = Field(default_factory=lambda: [ModelRewardSource()], min_length=1)

    @field_validator("sources")
    @classmethod
    def _one_model(cls, v):
        if sum(s.type == "model" for s in v) > 1:
            raise ValueError("at most one `model` source: there is one reward model (ppo.reward_model)")
        return v


Advantage = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # baselines from a prompt's own group


class PPOConfig(Section):
    """PPO with four models (InstructGPT; GUIDE §2). Actor and critic step through the same backend as
    every other stage, each with its own TrainConfig (ZeRO stage, offload, dtype, LoRA, learning rate);
    reference and reward are frozen and only choose precision and placement."""

    actor_model: str | None = None  # default: the SFT stage's final model
    reward_model: str | None = None  # default: the RM stage's final model
    critic_model: str | None = None  # default: the reward model (value head included)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reference: FrozenModelConfig = Field(default_factory=FrozenModelConfig)
    reward: PPORewardConfig = Field(default_factory=PPORewardConfig)
    retokenize: bool = False  # actor and RM tokenizers differ: score the decoded text re-tokenized for the RM

    # Rollouts
    rollout_batch_size: int = Field(8, ge=1)  # prompts per PPO step, over all processes
    n_samples_per_prompt: int = Field(1, ge=1)  # responses per prompt: a group (grpo, rloo, ... need ≥ 2)
    generation_batch_size: int | None = Field(None, ge=1)  # prompts per generate() call; default: all of a process's
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    rollout_dtype: Precision = "auto"  # auto: the actor's precision (a sampler in another is off-policy)
    # How the rollout copy runs its decoding loop; every choice samples the same tokens (row-seeded):
    # dynamic: a KV cache growing by one column per step; static: a fixed-shape StaticCache of prompt width +
    # max_new_tokens rounded up to 64, kept and reused per (batch, length); compiled: static with the decode
    # step under torch.compile (CUDA graphs on a GPU; needs a C++ compiler on a CPU). auto: compiled where
    # CUDA is available, dynamic on a CPU (docs/algorithms.md, "Rollouts")
    rollout_decoding: Decoding = "auto"
    # When the rollout copy is exactly the trained actor (full fine-tune, the actor's precision, no dropout),
    # the log-probs the sampler computed are the old log-probs: one actor forward fewer per step. Checked on a
    # process's first step and every 10th: a gap over 1e-3 per token (bf16) recomputes them from then on.
    reuse_rollout_logprobs: bool = True
    # Truncated importance sampling (Yao et al. 2025): weight each token's policy-gradient loss by
    # min(π_old/π_sampler, tis_cap) where sampler and trainer differ (LoRA, rollout_dtype, bf16); None: off
    tis_cap: float | None = Field(None, gt=0)
    steps: int = Field(30, ge=1)  # PPO steps (rollout + update)

    # Advantages: gae (PPO with the critic) or a critic-free estimator (docs/algorithms.md)
    advantage: Advantage = "gae"
    # token_mean: Σ over every token / tokens; seq_mean_token_mean: mean over responses of each one's token
    # mean (GRPO); seq_mean_token_sum_norm: Σ / (responses · max_new_tokens) (Dr. GRPO, length-unbiased)
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    # Drop groups whose rewards are all equal (no signal under a group baseline; DAPO), counted in
    # rollout/groups_dropped
    dynamic_sampling: bool = False

    # PPO
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_size: int | None = Field(None, ge=1)  # responses per optimizer step, over all processes; default: all
    kl_coef: float = Field(0.1, ge=0)
    # reward: −β·KL in each token's reward (InstructGPT); loss: β·KL added to the policy loss (GRPO); off: none
    kl_mode: Literal["reward", "loss", "off"] = "reward"
    kl_estimator: Literal["k1", "k3", "abs", "mse"] | None = None  # default: k1 in the reward, k3 as a loss
    adaptive_kl: AdaptiveKLConfig | None = None
    # (s − mean)/std with the reward's mean/std on the initial policy's own samples of PPO prompts, measured
    # at the start on normalize_samples of them (whole rollout batches) and kept in every checkpoint
    normalize_scores: bool = False
    # Responses, i.e. prompts × n_samples_per_prompt: with n > 1 they are not independent (n answers to one
    # prompt share it), so the count of independent samples lies nearer normalize_samples / n. 64 independent:
    # the std's relative standard error is about 1/√(2n) ≈ 9%, which moves the effective KL coefficient by as
    # much, well inside how precisely one chooses it (lm-human-preferences used 256 on GPUs); scale it with n
    normalize_samples: int = Field(64, ge=2)
    score_clip: float | None = Field(5.0, gt=0)
    missing_eos_penalty: float | None = None  # added to the score of responses cut at max_new_tokens
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    clip_low: float | None = Field(None, gt=0, lt=1)  # ratio floor 1 − clip_low; default: cliprange
    clip_high: float | None = Field(None, gt=0)  # ratio ceiling 1 + clip_high; default: cliprange (DAPO: 0.28)
    cliprange_value: float = Field(0.2, gt=0)
    whiten_advantages: bool = True
    ptx_coef: float = Field(0.0, ge=0)  # > 0: add this times the SFT loss on phase-1 rows to the actor loss
    ema_decay: float | None = Field(None, gt=0, lt=1)  # keep an EMA of the actor, saved as final-ema/

    # Eval, checkpoints
    eval_every: int = Field(10, ge=0)  # steps; 0: only before and after training
    eval_prompts: int = Field(64, ge=1)  # held-out phase-3 prompts scored at each eval
    samples_logged: int = Field(4, ge=0)  # eval prompt/response pairs written to samples.jsonl
    save_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    resume: Literal["auto", "never", "force"] = "auto"  # as in TrainConfig
    seed: int = 42
    wandb_project: str | None = None

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def responses_per_step(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def kl_estimator_used(self) -> str:
        return self.kl_estimator or ("k3" if self.kl_mode == "loss" else "k1")

    @model_validator(mode="after")
    def _checks(self):
        if self.mini_batch_size and self.responses_per_step % self.mini_batch_size:
            raise ValueError(f"rollout_batch_size × n_samples_per_prompt ({self.responses_per_step}) must be a "
                             f"multiple of mini_batch_size ({self.mini_batch_size})")
        if self.advantage in GROUP_ADVANTAGES and self.n_samples_per_prompt < 2:
            raise ValueError(f"advantage {self.advantage} takes its baseline from the other responses to the same "
                             "prompt: set n_samples_per_prompt to 2 or more")
        if self.dynamic_sampling and self.n_samples_per_prompt < 2:
            raise ValueError("dynamic_sampling drops groups whose rewards are all equal: it needs "
                             "n_samples_per_prompt ≥ 2")
        if self.kl_mode == "loss" and self.kl_estimator in ("k1", "abs"):
            raise ValueError(f"kl_estimator {self.kl_estimator} as a loss term has no useful gradient (k1's is 0 "
                             "in expectation); use k3 (GRPO) or mse")
        if self.normalize_scores and not any(s.type == "model" for s in self.reward.sources):
            raise ValueError("normalize_scores normalises the reward model's score, but reward.sources has no "
                             "`model` source")
        for key in ("kl_estimator", "adaptive_kl", "kl_coef"):
            if _changed(self, key) and self.kl_mode == "off":
                raise ValueError(f"{key} is set but kl_mode is off: nothing would use it")
        if not self.uses_critic:
            for key in ("critic", "critic_model", "cliprange_value", "lam", "whiten_advantages"):
                if _changed(self, key):
                    raise ValueError(f"{key} is set, but only advantage gae reads it (a critic, GAE's λ and its "
                                     f"whitening); advantage {self.advantage} has its own baseline and scale")
        return self


class EvalConfig(Section):
    """`rlhfkit eval`: the aligned model against the SFT model on held-out prompts, judged by the RM."""

    policy: str | None = None  # default: the aligned stage's final model (ppo/final, or dpo/final with alignment: dpo)
    baseline: str | None = None  # default: the SFT stage's final model
    reward_model: str | None = None  # default: ppo.reward_model, else the RM stage's final model
    second_judge: str | None = None  # another reward model directory scoring the same responses
    # "phase3": the held-out phase-3 prompts of this run; anything else: a prompt file (jsonl/json/parquet)
    prompt_sets: list[str] = Field(default_factory=lambda: ["phase3"])
    max_prompts: int = Field(64, ge=1)  # per set
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    batch_size: int = Field(8, ge=1)
    dtype: Precision = "auto"
    decoding: Decoding = "auto"  # as ppo.rollout_decoding, for both models' answers
    seed: int = 1234
    # Rewards computed from the text and the prompt records' metadata (gsm8k, exact, regex, format, python,
    # remote; not `model`, the judge is reward_model), each reported per model and set with an interval:
    # e.g. GSM8K accuracy and format rate
    rewards: list[RewardSource] = Field(default_factory=list)

    @field_validator("rewards")
    @classmethod
    def _no_model(cls, v):
        if any(s.type == "model" for s in v):
            raise ValueError("a `model` source is the judge: set eval.reward_model instead")
        return v


class ExportConfig(Section):
    gguf: Literal["f16", "q8_0", "none"] = "q8_0"


class PipelineConfig(Section):
    alignment: Literal["ppo", "dpo"] = "ppo"  # dpo: DPO from the SFT model instead of RM + PPO
    # Finish the pipeline within this wall time: each training stage gets a share of what is left and
    # plans its number of steps (at most the configured one) from the step times it measures.
    time_budget_minutes: float | None = Field(None, gt=0)
    budget_shares: dict[Literal["sft", "rm", "ppo", "dpo", "eval"], float] = Field(
        default_factory=lambda: {"sft": 2.0, "rm": 7.0, "ppo": 5.0, "dpo": 7.0, "eval": 2.0})

    @field_validator("budget_shares")
    @classmethod
    def _shares(cls, v):
        if any(s <= 0 for s in v.values()):
            raise ValueError(f"shares must be positive, got {v}")
        return v


class RunConfig(Section):
    output_dir: str = "runs/default"
    seed: int = 42


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe, apply `a.b.c=value` overrides, validate. Errors name the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    try:
        raw = _expand_env(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, path, overrides)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key written twice in one mapping is an error: PyYAML keeps the last one
    silently, so a section repeated further down the file would reset everything set in the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}); write each key once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = _list_item(node, part, key)
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            done = ".".join(parts[:i + 1])
            raise ConfigError(f"override {item!r}: {done} is a single value ({node!r}), it has no key {nxt!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else None
        if idx is None or idx > len(node):
            raise ConfigError(f"override {item!r}: {key} is not an index into a list of {len(node)}")
        node[idx:idx + 1] = [parsed]
    else:
        node[last] = parsed


def _list_item(node: list, part: str, key: str):
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index into a list of {len(node)}")
    return node[int(part)]


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value, where: str = ""):
    """Expand ${NAME} and ${NAME:-default} in string values; an unset NAME without default is an error."""
    if isinstance(value, str):
        def sub(m):
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set (or write ${{{m.group(1)}:-default}})")
        return _ENV_VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}.{i}") for i, v in enumerate(value)]
    return value


def format_validation_error(err: ValidationError, path: Path, overrides=()) -> str:
    lines = [f"{path}: invalid config ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    override_keys = {o.partition("=")[0].strip() for o in overrides}
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for the keys each section takes)"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        where = " [from command line]" if loc in override_keys else ""
        lines.append(f"  {loc}: {msg}{where}")
    return "\n".join(lines)


def save_resolved_config(cfg: Config, out_dir: Path, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config (defaults filled in) next to a stage's outputs."""
    from .paths import write_text_atomic

    out = Path(out_dir) / name
    write_text_atomic(out, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out

"""Typed run configuration: one YAML recipe per run, plus dotted command-line overrides.

    rlhfkit data prepare configs/quickstart.yaml data.max_seq_len=256

Every section forbids unknown keys, so a typo is an error naming the key and the file (with the nearest
valid key), never a silently ignored setting. Every key has a description in the schema: `rlhfkit config
show CONFIG` prints them beside the resolved values, and docs/config.md is generated from them
(rlhfkit/config_tools.py).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

# YAML 1.1 (PyYAML) reads these unquoted words as booleans: `ppo.kl_mode=off` arrives as False.
_YAML_BOOLEAN_WORDS = {True: ("on", "yes", "true", "y"), False: ("off", "no", "false", "n")}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans(cls, data):
        """A boolean given to a key whose choices include its word (off/on/yes/no) is that word."""
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for key, value in data.items():
            if isinstance(value, bool) and key in cls.model_fields:
                choices = literal_choices(cls.model_fields[key].annotation)
                word = next((w for w in _YAML_BOOLEAN_WORDS[value] if w in choices), None)
                if word is not None and value not in choices:
                    fixed[key] = word
        return fixed


def literal_choices(annotation) -> tuple:
    """The values of the Literal in an annotation (through `| None`), or () when it has none."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return tuple(c for arg in typing.get_args(annotation) for c in literal_choices(arg))


# auto: bf16 where the hardware runs it natively, fp16 on GPUs without bf16, fp32 elsewhere
# (engine/precision.py); resolved once per stage and saved in the resolved config.
Precision = Literal["auto", "float32", "bfloat16", "float16"]
# The decoding loop of rollouts and eval answers (engine/generation.py): auto, dynamic, static or compiled
Decoding = Literal["auto", "dynamic", "static", "compiled"]
DTYPE_HELP = ("auto: bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), "
              "fp16 on older GPUs, fp32 elsewhere")
# Every stage seed not set in its section is run.seed (Config._inherit_seeds); standalone sections use this
DEFAULT_SEED = 42
SEEDED_SECTIONS = ("data", "sft", "rm", "dpo", "ppo", "eval")


class TinyModelConfig(Section):
    """A small random Llama for tests: vocab ~1000, 2 layers, loads in milliseconds."""

    vocab_size: int = Field(1000, ge=300, description="tokenizer vocabulary size")
    hidden_size: int = Field(64, ge=8, description="model width")
    intermediate_size: int = Field(128, ge=8, description="MLP width")
    num_layers: int = Field(2, ge=1, description="transformer layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    num_kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention)")
    max_position_embeddings: int = Field(1024, ge=16, description="longest sequence, in tokens")
    chat_template: bool = Field(True, description="give the tokenizer a chat template")
    seed: int = Field(0, description="seed of the random weights: part of the model's identity, so not run.seed")


class ModelConfig(Section):
    """The base model every stage starts from (unless a stage names its own)."""

    name_or_path: str = Field("smollm2-135m-instruct", description=(
        "a local HF directory, a hub id, or a built-in name: smollm2-135m-instruct (the embedded GGUF, "
        "converted once) or tiny-random (built from model.tiny)"))
    tokenizer: str | None = Field(None, description="tokenizer directory or hub id; default: name_or_path")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of name_or_path")
    dtype: Precision = Field("auto", description=("precision of a load that names none (library calls); each stage sets its "
                                                  f"own. {DTYPE_HELP}"))
    trust_remote_code: bool = Field(False, description="allow the model's own Python code (hub models that need it)")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="the tiny-random model's shape")


DatasetFormat = Literal["preference", "sft", "prompt"]


class DatasetConfig(Section):
    """One dataset of the blend: a local file or `datasets` directory, a hub dataset id, or a registry name.
    Its records may use rlhfkit's or TRL's field names (docs/data.md), or others renamed by `fields`."""

    name: str = Field(description=(
        "the dataset's name in the blend; without `path`, a hub dataset id (loaded through `datasets`) or a "
        "registry name (data/registry.py)"))
    path: str | None = Field(None, description=(
        "local .jsonl / .jsonl.gz / .json / .parquet / .arrow / .feather / .csv file, or a `datasets` "
        "save_to_disk directory; its records (a DatasetDict's train split) are the train split"))
    eval_path: str | None = Field(None, description=(
        "local eval split (a file or directory as for path); default: a DatasetDict's test or validation "
        "split, else data.eval_fraction carved out of train"))
    format: DatasetFormat | None = Field(None, description=(
        "preference | sft | prompt; default: detected from the first record (a registry dataset's own)"))
    fields: dict[Literal["prompt", "chosen", "rejected", "response", "completion", "messages"],
                 Annotated[str, Field(min_length=1)]] = Field(default_factory=dict, description=(
        "rename the records' fields onto rlhfkit's before the format is detected, e.g. {prompt: question, "
        "chosen: better, rejected: worse}; a record without a mapped field is a bad record"))
    phases: list[Literal[1, 2, 3]] | None = Field(None, description=(
        "restrict the phases this dataset feeds; default: preference 1-3, sft 1, prompt 3"))
    max_records: int | None = Field(None, ge=1, description="keep only the first N valid records (quick runs)")

    @field_validator("phases")
    @classmethod
    def _phases_unique(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must list each phase 1, 2, 3 at most once, and at least one")
        return v


class DataConfig(Section):
    """The data of every phase: datasets blended, split by prompt into phases, tokenized and cached."""

    datasets: list[DatasetConfig] = Field(min_length=1, description="the blend: one entry per dataset (required)")
    phase_ratios: tuple[float, float, float] = Field((2.0, 4.0, 4.0), description=(
        "share of each dataset given to phase 1 (SFT), 2 (reward model, DPO), 3 (RL prompts), as in "
        "DeepSpeed-Chat; records sharing a prompt stay in one phase"))
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description=(
        "share of a dataset without eval_path held out for evaluation (by prompt)"))
    max_eval_records: int | None = Field(None, ge=1, description="cap on each dataset's eval records, after carving")
    seed: int = Field(DEFAULT_SEED, description="seed of the phase and eval splits; default: run.seed")
    max_seq_len: int = Field(512, ge=8, description="longest tokenized example (prompt + response), in tokens")
    max_prompt_len: int = Field(256, ge=4, description="longest prompt, in tokens (RL prompts and eval prompts too)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description=(
        "an example over the limits: truncate (the prompt from the left, then the response from the right; "
        "counted) or drop it"))
    template: Literal["auto", "plain"] = Field("auto", description=(
        "auto: the tokenizer's chat template where it has one; plain: hh-style \"Human: … Assistant: …\" text"))
    eos_token: str | None = Field(None, description="token appended to responses; default: the tokenizer's EOS (one token)")
    system_prompt: str | None = Field(None, description=(
        "a system turn put before every prompt that has none (e.g. how to format the final answer); with a chat "
        "template it replaces the template's default system prompt"))
    on_bad_record: Literal["skip", "error"] = Field("skip", description=(
        "a malformed record: skip it (counted and reported) or stop at it, naming it"))
    cache_dir: str | None = Field(None, description="tokenized-data cache; default: <user cache>/rlhfkit/data")

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

    r: int = Field(0, ge=0, description="adapter rank; 0: no LoRA (full fine-tuning)")
    alpha: float = Field(16.0, description="scaling numerator: the update is (alpha / r)·BA")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="module names that get adapters")
    learning_rate: float | None = Field(None, gt=0, description="the adapters' own learning rate; default: the stage's")
    only_optimize_lora: bool = Field(True, description="false: the rest of the model trains too (at the stage's rate)")
    quantize_4bit: bool = Field(False, description="QLoRA: NF4 base weights through bitsandbytes (CUDA)")
    save: Literal["merged", "adapter"] = Field("merged", description=(
        "final/ holds merged full weights (what later stages and export need) or the adapter only"))

    @property
    def enabled(self) -> bool:
        return self.r > 0


SCHEDULERS = Literal["cosine", "linear", "constant", "constant_with_warmup"]


class TrainConfig(Section):
    """How a stage steps its optimizer: the same keys for SFT, RM, DPO (and the PPO actor/critic)."""

    micro_batch_size: int = Field(4, ge=1, description=(
        "rows per forward pass on each process (a row: an example; for RM and DPO a chosen/rejected pair)"))
    gradient_accumulation_steps: int = Field(1, ge=1, description=(
        "micro-batches per optimizer step; global batch = micro_batch_size × this × processes"))
    epochs: int = Field(1, ge=1, description="passes over the phase's training rows")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    learning_rate: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms)")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description=(
        "AdamW (β1, β2); note β2 0.95 as in DeepSpeed-Chat and OpenRLHF, where TRL and torch default to 0.999"))
    lr_scheduler: SCHEDULERS = Field("cosine", description="learning-rate schedule after warm-up (to 0 for cosine/linear)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warm-up as a share of all steps, used when warmup_steps is 0")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient's global norm to this; null: no clipping")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")
    dtype: Precision = Field("auto", description=(
        f"training precision; {DTYPE_HELP}; on a CPU, full weights below a learning rate of 2e-4 train in fp32 "
        "(docs/performance.md)"))
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description=(
        "DeepSpeed ZeRO: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters partitioned"))
    offload_optimizer: bool = Field(False, description="ZeRO ≥ 1: optimizer state in CPU memory")
    offload_param: bool = Field(False, description="ZeRO-3: parameters in CPU memory")
    dropout: float | None = Field(None, ge=0, lt=1, description="set the model's dropout; null: keep the model's own")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning")
    eval_every: int = Field(0, ge=0, description="optimizer steps between evals; 0: only before and after training")
    eval_at_start: bool = Field(True, description=(
        "evaluate before the first step (false for a fresh reward head: it scores at chance)"))
    max_eval_batches: int | None = Field(None, ge=1, description="micro-batches per process an eval reads; null: the whole eval split")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0: only the final model")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    log_every: int = Field(1, ge=1, description="optimizer steps between metric lines")
    resume: Literal["auto", "never", "force"] = Field("auto", description=(
        "auto: continue from the latest intact checkpoint made with the same settings; force: also under changed "
        "settings; never: start fresh"))
    max_nonfinite_steps: int = Field(0, ge=0, description=(
        "steps with a non-finite loss or gradient norm skipped (no update) before the run stops; 0: the first stops it"))
    seed: int = Field(DEFAULT_SEED, description="seed of the data order, dropout and new weights; default: run.seed")

    @model_validator(mode="after")
    def _checks(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on phase-1 data."""

    loss_on: Literal["response", "all"] = Field("response", description=(
        "response: prompt tokens are masked out of the loss; all: every token counts"))
    learning_rate: float = Field(2e-5, gt=0, description="peak learning rate (AdamW)")
    packing: bool = Field(False, description=(
        "pack a micro-batch's sequences several to a row (each attends only to itself, positions restart at 0): "
        "the same loss and gradients with fewer padding positions"))


class RewardConfig(TrainConfig):
    """The reward model: Bradley–Terry on phase-2 pairs, the score read at each sequence's last token."""

    model: str | None = Field(None, description="backbone to start from; default: model.name_or_path")
    margin: float = Field(0.0, description="Bradley–Terry margin: −log σ(r_chosen − r_rejected − margin)")
    center_coef: float = Field(0.0, ge=0, description="weight of mean((r_chosen + r_rejected)²), keeps scores centred")
    learning_rate: float = Field(1e-5, gt=0, description="peak learning rate of the backbone (AdamW)")
    head_learning_rate: float | None = Field(None, gt=0, description=(
        "learning rate of the freshly initialised score head; default: learning_rate"))
    freeze_layers: int = Field(0, ge=0, description=(
        "keep the embeddings and the lowest N transformer layers as loaded (the backward pass stops above them); "
        "with rm.lora, the adapters go in the layers above only"))
    packing: bool = Field(False, description=(
        "pack a micro-batch's pairs several to a row, each pair's shared prompt computed once (its chosen and "
        "rejected replies attend to it and to themselves only): the same scores and gradients from fewer positions"))


class DPOConfig(TrainConfig):
    """DPO on phase-2 pairs, instead of reward model + PPO (pipeline.alignment: dpo)."""

    model: str | None = Field(None, description=(
        "policy to start from; default: the SFT stage's output, else model.name_or_path"))
    beta: float = Field(0.1, gt=0, description="DPO's β: strength of the implicit KL to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="> 0: conservative DPO (labels flipped with this probability)")
    learning_rate: float = Field(1e-6, gt=0, description="peak learning rate (AdamW)")
    dropout: float | None = Field(None, ge=0, lt=1, description="null: 0 in DPO (policy and reference), as TRL does")


class FrozenModelConfig(Section):
    """A model PPO only runs forward (reference, reward): precision and placement, no optimizer."""

    dtype: Precision = Field("auto", description="auto: the actor's resolved precision, so step-0 KL is exactly 0")
    zero_stage: Literal[0, 3] = Field(0, description="3: parameters partitioned over processes (gathered layer by layer)")
    offload_param: bool = Field(False, description="ZeRO-3 only: keep the partitions in CPU memory")

    @model_validator(mode="after")
    def _checks(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        return self


class SamplingSettings(Section):
    """How responses are sampled."""

    max_new_tokens: int = Field(64, ge=1, description="longest response, in tokens")
    temperature: float = Field(0.7, gt=0, description="softmax temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; PPO must keep 1.0 (its ratio and KL use the full distribution)")
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens; 0: off (PPO must keep 0)")
    stop_ids: list[int] = Field(default_factory=list, description="token ids that end a response besides the tokenizer's EOS")


class AdaptiveKLConfig(Section):
    """Adaptive β (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·responses/horizon)."""

    target: float = Field(6.0, gt=0, description="KL per response (nats, summed over its tokens) to steer towards")
    horizon: float = Field(10000, gt=0, description="in responses: how slowly β follows")


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
                "seed": "ppo.seed",
                "gradient_accumulation_steps": "ppo.mini_batch_size (accumulation follows from it)"}


class ActorConfig(TrainConfig):
    """The RL actor's backend settings. micro_batch_size also sizes the experience forward passes;
    gradient accumulation follows from ppo.mini_batch_size. The loop's own keys (RL_LOOP_KEYS) are errors
    here: the RL loop would not read them."""

    micro_batch_size: int = Field(8, ge=1, description=(
        "responses per forward pass on each process (updates and experience passes)"))
    learning_rate: float = Field(1e-6, gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: SCHEDULERS = Field("constant", description="learning-rate schedule over ppo.steps after warm-up")
    dropout: float | None = Field(0.0, ge=0, lt=1, description=(
        "the model's dropout; 0: PPO's ratios need the same network in rollout and update"))

    @model_validator(mode="after")
    def _loop_keys(self):
        for key in sorted(k for k in RL_LOOP_KEYS if _changed(self, k)):  # a saved config repeats the defaults
            raise ValueError(f"{key} is not read here: the RL loop sets it for actor and critic; use "
                             f"{RL_LOOP_KEYS[key]}")
        return self


class CriticConfig(ActorConfig):
    """The critic's backend settings (advantage gae only)."""

    learning_rate: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")


class _RewardSourceBase(Section):
    weight: float = Field(1.0, description="the reward is the weighted sum of every source's")
    name: str | None = Field(None, description="logged as reward/<name>; default: the type (numbered when repeated)")


class ModelRewardSource(_RewardSourceBase):
    """The trained reward model (ppo.reward_model, else the RM stage's output) on the token sequences."""

    type: Literal["model"] = Field("model", description="the reward model's score")


class PythonRewardSource(_RewardSourceBase):
    """function(prompts, responses, metadata) -> floats, one per response; "package.module:function" or
    "path/to/file.py:function" (relative paths from the working directory)."""

    type: Literal["python"] = Field(description="your own Python function")
    function: str = Field(pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$", description=(
        '"package.module:function" or "path/to/file.py:function"'))


class Gsm8kRewardSource(_RewardSourceBase):
    """1 when the response's final number equals the record's reference answer (metadata[answer_key])."""

    type: Literal["gsm8k"] = Field(description="GSM8K's final-number check")
    answer_key: str = Field("final_answer", description="the records' metadata field holding the reference answer")


class ExactRewardSource(_RewardSourceBase):
    """1 when the response, stripped, equals metadata[answer_key] (stripped)."""

    type: Literal["exact"] = Field(description="exact match with the reference")
    answer_key: str = Field("answer", description="the records' metadata field holding the reference answer")


class RegexRewardSource(_RewardSourceBase):
    """1 when the regex is found in the response (re.search)."""

    type: Literal["regex"] = Field(description="a regular expression found in the response")
    pattern: str = Field(description="Python regular expression (re.search)")


class FormatRewardSource(_RewardSourceBase):
    """1 when the response ends in the answer format; default: GSM8K's "#### <number>" line."""

    type: Literal["format"] = Field(description="the response ends in the answer format")
    pattern: str = Field(r"####\s*-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*$",
                         description="Python regular expression the response's end must match")


class RemoteRewardSource(_RewardSourceBase):
    """An HTTP reward server speaking OpenRLHF's remote reward-model protocol (docs/rewards.md)."""

    type: Literal["remote"] = Field(description="an HTTP reward server")
    url: str = Field(pattern=r"^https?://", description="the server's URL")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(2, ge=0, description="further tries after a failed request, with backoff")
    batch_size: int = Field(64, ge=1, description="responses per request")
    label_key: str | None = Field(None, description="the records' metadata field sent as the protocol's \"labels\"")


RewardSource = Annotated[ModelRewardSource | PythonRewardSource | Gsm8kRewardSource | ExactRewardSource
                         | RegexRewardSource | FormatRewardSource | RemoteRewardSource, Field(discriminator="type")]


class PPORewardConfig(FrozenModelConfig):
    """Where the RL reward comes from: a weighted sum of sources, each logged as reward/<name>. The
    placement keys (dtype, zero_stage, offload_param) are the reward model's, used when a `model` source is."""

    sources: list[RewardSource] = Field(default_factory=lambda: [ModelRewardSource()], description=(
        "reward sources, each {type: model | python | gsm8k | exact | regex | format | remote, weight, name, ...}; "
        "[] only where ppo.environment rewards the run alone"))

    @field_validator("sources")
    @classmethod
    def _one_model(cls, v):
        if sum(s.type == "model" for s in v) > 1:
            raise ValueError("at most one `model` source: there is one reward model (ppo.reward_model)")
        return v


class OpenEnvConfig(Section):
    """An OpenEnv environment server (ppo.environment: openenv): each episode is a session on its WebSocket
    (<url>/ws); the reply's text is the Action's action_field, the Observation's observation_field a user
    message (docs/agents.md)."""

    url: str = Field(pattern=r"^(https?|wss?)://", description=(
        "the server's address, e.g. http://127.0.0.1:8000 (sessions connect to its /ws, without a proxy)"))
    action_field: str = Field("message", min_length=1, description="the Action's field that carries the reply's text")
    observation_field: str = Field(min_length=1, description=(
        "the Observation's string field that becomes a user message (reset's opens the episode; empty: none)"))
    timeout: float = Field(60.0, gt=0, description="seconds to connect, and for each answer")


Advantage = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # baselines from a prompt's own group


# Settings only advantage gae reads (the critic, GAE's λ, whitening), and those only a KL term reads
CRITIC_ONLY_KEYS = ("critic", "critic_model", "cliprange_value", "lam", "whiten_advantages")
KL_ONLY_KEYS = ("kl_estimator", "adaptive_kl", "kl_coef")


class PPOConfig(Section):
    """RL on phase-3 prompts: PPO with four models (InstructGPT; GUIDE §2) or a critic-free estimator
    (GRPO, Dr. GRPO, RLOO, REINFORCE++). Actor and critic step through the same backend as every other
    stage, each with its own TrainConfig (ZeRO stage, offload, dtype, LoRA, learning rate); reference and
    reward are frozen and only choose precision and placement."""

    actor_model: str | None = Field(None, description=(
        "the policy to start from; default: the SFT stage's final model, or model.name_or_path where no dataset "
        "feeds SFT (the pipeline then skips SFT)"))
    reward_model: str | None = Field(None, description="the reward model of a `model` source; default: the RM stage's final model")
    critic_model: str | None = Field(None, description="gae only: the critic's start; default: the reward model (its head included)")
    actor: ActorConfig = Field(default_factory=ActorConfig, description="the actor's optimizer and placement")
    critic: CriticConfig = Field(default_factory=CriticConfig, description="gae only: the critic's optimizer and placement")
    reference: FrozenModelConfig = Field(default_factory=FrozenModelConfig, description="the frozen reference (KL)")
    reward: PPORewardConfig = Field(default_factory=PPORewardConfig, description="where the reward comes from")
    retokenize: bool = Field(False, description=(
        "actor and reward model tokenizers differ: score the decoded text re-tokenized for the reward model"))

    # Rollouts
    rollout_batch_size: int = Field(8, ge=1, description=(
        "prompts per RL step, over all processes (verl: data.train_batch_size; TRL counts responses)"))
    n_samples_per_prompt: int = Field(1, ge=1, description=(
        "responses per prompt, a group (TRL: num_generations; verl: rollout.n); grpo, dr_grpo, rloo, "
        "reinforce_pp_baseline need ≥ 2"))
    generation_batch_size: int | None = Field(None, ge=1, description=(
        "responses per generate() call on each process; default: all of the process's"))
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="rollout sampling")
    rollout_dtype: Precision = Field("auto", description="auto: the actor's precision (a sampler in another is off-policy)")
    rollout_decoding: Decoding = Field("auto", description=(
        "the rollout decoding loop, all sampling the same tokens: dynamic (growing KV cache), static (fixed-shape "
        "cache), compiled (static under torch.compile); auto: compiled with CUDA, dynamic on a CPU"))
    reuse_rollout_logprobs: bool = Field(True, description=(
        "when the rollout copy is exactly the trained actor, its sampling log-probs are the old log-probs (one "
        "actor forward fewer); checked every 10th step, recomputed from then on past a gap of 1e-3 per token"))
    tis_cap: float | None = Field(None, gt=0, description=(
        "truncated importance sampling (Yao et al. 2025): weight each token's loss by min(π_old/π_sampler, "
        "tis_cap) where sampler and trainer differ; null: off"))
    steps: int = Field(30, ge=1, description="RL steps (each: rollouts, then ppo_epochs of updates)")

    # Episodes: several model turns with tools or an environment between them (docs/agents.md)
    tools: list[str] = Field(default_factory=list, description=(
        "tools the model may call between its turns: built-in names (calculator, python), "
        "\"package.module:function\" or \"path/to/file.py:function\"; needs max_turns ≥ 2"))
    environment: str | None = Field(None, description=(
        "an environment class (guess_number, \"package.module:Class\" or \"path/to/file.py:Class\") with "
        "reset(metadata) and step(assistant_message), one instance per episode, or openenv (an OpenEnv server, "
        "ppo.openenv); its reward joins the sum as reward/environment; null: none"))
    environment_weight: float = Field(1.0, description="weight of the environment's per-episode reward in the sum")
    openenv: OpenEnvConfig | None = Field(None, description=(
        "the server of environment: openenv (url, action_field, observation_field, timeout); null otherwise"))
    max_turns: int = Field(1, ge=1, description=(
        "model turns per episode; an episode also ends on a reply without a tool call (or the environment's "
        "done), and on max_episode_tokens; > 1 needs tools or an environment"))
    max_episode_tokens: int | None = Field(None, ge=1, description=(
        "new tokens per episode after the prompt, the model's and the tools' or environment's together (each "
        "model turn is at most sampling.max_new_tokens); default: 2 × max_turns × sampling.max_new_tokens, as much "
        "again for what is added as for the model"))
    tool_timeout_s: float = Field(10.0, gt=0, description=(
        "the most a turn's tool calls may take, all of a batch's at once; a call still running then is a "
        "timeout observation"))

    # Advantages
    advantage: Advantage = Field("gae", description=(
        "gae (PPO with a critic) or a critic-free estimator: grpo, dr_grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline (docs/algorithms.md)"))
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description=(
            "token_mean: Σ over every token / tokens; seq_mean_token_mean: mean over responses of each one's "
            "token mean (GRPO); seq_mean_token_sum_norm: Σ / (responses · the episode's token budget: max_new_tokens for one turn) (Dr. GRPO)"))
    dynamic_sampling: bool = Field(False, description=(
        "drop groups whose rewards are all equal (no signal under a group baseline; DAPO)"))

    # PPO
    ppo_epochs: int = Field(1, ge=1, description="passes over each step's responses")
    mini_batch_size: int | None = Field(None, ge=1, description=(
        "responses (not prompts: verl's ppo_mini_batch_size counts prompts) per optimizer step, over all "
        "processes; default: all of the step's (one update per epoch)"))
    kl_coef: float = Field(0.1, ge=0, description="β of the KL to the reference (TRL's GRPO: beta; OpenRLHF: init_kl_coef)")
    kl_mode: Literal["reward", "loss", "off"] = Field("reward", description=(
        "reward: −β·KL in each token's reward (InstructGPT); loss: β·KL added to the policy loss (GRPO); off: none"))
    kl_estimator: Literal["k1", "k3", "abs", "mse"] | None = Field(None, description=(
        "default: k1 in the reward, k3 as a loss"))
    adaptive_kl: AdaptiveKLConfig | None = Field(None, description="adaptive β (starting at kl_coef); null: fixed β")
    normalize_scores: bool = Field(False, description=(
        "(score − mean)/std with the reward model's mean/std on the initial policy's own samples, measured at "
        "the start and kept in every checkpoint"))
    normalize_samples: int = Field(64, ge=2, description=(
        "responses (prompts × n_samples_per_prompt) measured for normalize_scores; scale it with n"))
    score_clip: float | None = Field(5.0, gt=0, description="clip the reward model's score to ±this; null: no clipping")
    missing_eos_penalty: float | None = Field(None, description="added to the score of responses cut at max_new_tokens")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE's discount γ over response tokens")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's λ (gae only)")
    cliprange: float = Field(0.2, gt=0, description="PPO's ratio clip ε (TRL's GRPO: epsilon)")
    clip_low: float | None = Field(None, gt=0, lt=1, description="ratio floor 1 − clip_low; default: cliprange")
    clip_high: float | None = Field(None, gt=0, description="ratio ceiling 1 + clip_high; default: cliprange (DAPO: 0.28)")
    cliprange_value: float = Field(0.2, gt=0, description="the critic's value clip (gae only)")
    whiten_advantages: bool = Field(True, description="whiten GAE's advantages over valid tokens (gae only)")
    ptx_coef: float = Field(0.0, ge=0, description="> 0: add this times the SFT loss on phase-1 rows to the actor's loss")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the actor, saved as final-ema/")

    # Eval, checkpoints
    eval_every: int = Field(10, ge=0, description="RL steps between evals; 0: only before and after training")
    eval_prompts: int = Field(64, ge=0, description=(
        "held-out phase-3 prompts answered and scored at each eval; 0: no eval inside the RL stage (the "
        "pipeline's eval stage compares the final model with its start on its own prompt sets)"))
    samples_logged: int = Field(4, ge=0, description="eval prompt/response pairs written to samples.jsonl")
    save_every: int = Field(0, ge=0, description="RL steps between checkpoints; 0: only the final model")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    resume: Literal["auto", "never", "force"] = Field("auto", description="as sft.resume")
    seed: int = Field(DEFAULT_SEED, description=(
        "seed of prompt order, sampling, mini-batch order and new weights (actor and critic); default: run.seed"))

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def responses_per_step(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def responses_per_update(self) -> int:
        """Responses per optimizer step (mini-batch), over all processes."""
        return self.mini_batch_size or self.responses_per_step

    @property
    def episodes(self) -> bool:
        """Whether rollouts are multi-turn episodes (tools or an environment answer the model)."""
        return bool(self.tools) or self.environment is not None

    @property
    def episode_tokens(self) -> int:
        """The most new tokens one rollout holds: the episode budget, or one reply's max_new_tokens."""
        if not self.episodes:
            return self.sampling.max_new_tokens
        return self.max_episode_tokens or 2 * self.max_turns * self.sampling.max_new_tokens

    @property
    def kl_estimator_used(self) -> str:
        return self.kl_estimator or ("k3" if self.kl_mode == "loss" else "k1")

    def unused_keys(self) -> list[str]:
        """Keys set to something else than their default that this estimator and KL mode do not read (a
        critic-free estimator switched on from the command line leaves the recipe's critic settings)."""
        unused = [] if self.uses_critic else [k for k in CRITIC_ONLY_KEYS if _changed(self, k)]
        if self.kl_mode == "off":
            unused += [k for k in KL_ONLY_KEYS if _changed(self, k)]
        return unused

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
        if self.eval_prompts == 0 and self.eval_every:
            raise ValueError(f"eval_every {self.eval_every} asks for evals, but eval_prompts 0 turns them off: set "
                             "eval_every to 0 or eval_prompts above 0")
        if self.normalize_scores and not any(s.type == "model" for s in self.reward.sources):
            raise ValueError("normalize_scores normalises the reward model's score, but reward.sources has no "
                             "`model` source")
        self._check_episodes()
        return self

    def _check_episodes(self) -> None:
        if self.tools and self.environment is None and self.max_turns < 2:
            raise ValueError("tools answer after the model's turn, so the model reads a result only in a next turn: "
                             "set max_turns to 2 or more")
        if self.max_turns > 1 and not self.episodes:
            raise ValueError(f"max_turns {self.max_turns}: nothing answers the model between its turns; set tools or "
                             "environment, or max_turns: 1")
        unused = [k for k, used in (("max_episode_tokens", self.episodes), ("tool_timeout_s", bool(self.tools)),
                                    ("environment_weight", self.environment is not None)) if not used and _changed(self, k)]
        if unused:
            raise ValueError(f"{', '.join(unused)} set, but there are no "
                             f"{'tools' if unused == ['tool_timeout_s'] else 'tools or environment'} to use it")
        if self.environment == "openenv" and self.openenv is None:
            raise ValueError("environment openenv needs the openenv section: the server's url and the observation's "
                             "observation_field (docs/agents.md)")
        if self.openenv is not None and self.environment != "openenv":
            env = "null" if self.environment is None else repr(self.environment)
            raise ValueError(f"openenv set, but environment is {env}, not openenv: nothing would connect to the "
                             "server (set environment: openenv, or remove openenv)")
        if len(set(self.tools)) < len(self.tools):
            raise ValueError(f"tools lists a tool twice: {self.tools}")
        if not self.reward.sources and self.environment is None:
            raise ValueError("reward.sources is empty: nothing would reward the run; list a source, or set environment "
                             "for a run rewarded by its environment alone")
        if self.environment is not None and any(s.name == "environment" for s in self.reward.sources):
            raise ValueError("a reward source is named `environment`, the name of the environment's reward: "
                             "rename the source")


def ppo_world_problems(p: PPOConfig, world: int) -> list[str]:
    """What RL cannot split over `world` processes: each process takes an equal share of a step's prompts
    and of each mini-batch's responses. The trainer raises the first; `rlhfkit config check` lists them."""
    mini = f"({p.mini_batch_size})" if p.mini_batch_size else f"(unset: all {p.responses_per_step} responses of a step)"
    return [f"ppo.{key} {n} must be a multiple of the number of processes ({world})"
            for key, n, size in (("rollout_batch_size", f"({p.rollout_batch_size})", p.rollout_batch_size),
                                 ("mini_batch_size", mini, p.responses_per_update))
            if size % world]


class EvalConfig(Section):
    """`rlhfkit eval`: the aligned model against the SFT model on held-out prompts, judged by the RM. Where
    ppo sets tools or an environment, both models run ppo's episodes (tools, environment, max_turns,
    max_episode_tokens, tool_timeout_s) with these sampling settings per turn (docs/evaluation.md)."""

    policy: str | None = Field(None, description=(
        "the model evaluated; default: the aligned stage's final model (ppo/final, or dpo/final)"))
    baseline: str | None = Field(None, description=(
        "the model it is compared with; default: the model the aligned stage started from (sft/final, "
        "ppo.actor_model or model.name_or_path)"))
    reward_model: str | None = Field(None, description="the judge; default: ppo.reward_model, else the RM stage's final model")
    second_judge: str | None = Field(None, description="another reward model directory scoring the same responses")
    prompt_sets: list[str] = Field(default_factory=lambda: ["phase3"], description=(
        "phase3: this run's held-out phase-3 prompts; anything else: a prompt file (jsonl/json/parquet)"))
    max_prompts: int = Field(64, ge=1, description="prompts per set")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description=(
        "how both models answer; where ppo sets tools or an environment, each turn of the episodes both run "
        "with ppo's episode settings (docs/evaluation.md)"))
    batch_size: int = Field(8, ge=1, description="prompts per generate() call and per scoring pass")
    dtype: Precision = Field("auto", description=f"precision of both models and the judges; {DTYPE_HELP}")
    decoding: Decoding = Field("auto", description="as ppo.rollout_decoding, for both models' answers")
    seed: int = Field(DEFAULT_SEED, description="seed of the answers' sampling and of the bootstrap intervals; default: run.seed")
    rewards: list[RewardSource] = Field(default_factory=list, description=(
        "rewards from the text and the prompts' metadata (as ppo.reward.sources, not `model`: the judge is "
        "reward_model), each reported per model and set with an interval, e.g. GSM8K accuracy"))

    @field_validator("rewards")
    @classmethod
    def _no_model(cls, v):
        if any(s.type == "model" for s in v):
            raise ValueError("a `model` source is the judge: set eval.reward_model instead")
        return v


class ExportConfig(Section):
    """`rlhfkit export`: the aligned model as an HF directory, and as a GGUF file for llama.cpp-based tools."""

    gguf: Literal["auto", "f16", "q8_0", "none"] = Field("auto", description=(
        "GGUF file type: auto: f16 where the model can be written (Llama-architecture, byte-level BPE "
        "tokenizer), else none, saying why; f16 or q8_0: that type, checked before training starts; none "
        "(or null): the HF directory only"))

    @field_validator("gguf", mode="before")
    @classmethod
    def _null_is_none(cls, v):
        return "none" if v is None else v


class PipelineConfig(Section):
    """`rlhfkit pipeline`: which stages run, and the time they may take."""

    alignment: Literal["ppo", "dpo"] = Field("ppo", description="ppo: reward model + RL; dpo: DPO from the SFT model")
    time_budget_minutes: float | None = Field(None, gt=0, description=(
        "finish within this wall time: each training stage gets a share of what is left and plans its steps "
        "(at most the configured ones) from its measured step times; null: no budget"))
    budget_shares: dict[Literal["sft", "rm", "ppo", "dpo", "eval"], float] = Field(
        default_factory=lambda: {"sft": 2.0, "rm": 7.0, "ppo": 5.0, "dpo": 7.0, "eval": 2.0},
        description="relative shares of the time budget per stage")

    @field_validator("budget_shares")
    @classmethod
    def _shares(cls, v):
        if any(s <= 0 for s in v.values()):
            raise ValueError(f"shares must be positive, got {v}")
        return v


class RunConfig(Section):
    """Where the run's outputs go, and its seed."""

    output_dir: str = Field("runs/default", description="every stage writes to <output_dir>/<stage>")
    seed: int = Field(DEFAULT_SEED, description=(
        "the seed of every stage that sets none: data.seed, sft/rm/dpo/ppo.seed, eval.seed"))


class WandbConfig(Section):
    """Weights & Biases logging for every stage (needs `pip install wandb`); metrics.jsonl and TensorBoard
    events are written either way."""

    project: str | None = Field(None, description="W&B project; null: no W&B logging")
    entity: str | None = Field(None, description="W&B team or user; default: your W&B default")
    group: str | None = Field(None, description="groups the stages' runs; default: the name of run.output_dir")
    name: str | None = Field(None, description=(
        "each stage's run is <name>/<stage> (e.g. quickstart/ppo); default: the name of run.output_dir"))


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="output directory and seed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    data: DataConfig = Field(description="datasets, phases, lengths (required)")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="supervised fine-tuning (phase 1)")
    rm: RewardConfig = Field(default_factory=RewardConfig, description="the reward model (phase 2)")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO (phase 2; pipeline.alignment: dpo)")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="RL: PPO and the critic-free estimators (phase 3)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the aligned model against the SFT model")
    export: ExportConfig = Field(default_factory=ExportConfig, description="HF directory and GGUF file")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="stages and time budget")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging")

    @model_validator(mode="after")
    def _inherit_seeds(self):
        """run.seed is the seed of every section that sets none (a resolved config sets them all)."""
        for name in SEEDED_SECTIONS:
            section = getattr(self, name)
            if "seed" not in section.model_fields_set:
                section.seed = self.run.seed
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def unused_settings(self) -> list[str]:
        """Settings this config gives but nothing of the run reads (a warning, not an error: they are
        what a recipe sets for another estimator or KL mode, left in place when switching)."""
        p, keys = self.ppo, self.ppo.unused_keys()
        if not keys:
            return []
        why = []
        if any(k in CRITIC_ONLY_KEYS for k in keys):
            why.append(f"advantage {p.advantage} has no critic (only gae reads the critic, λ and whitening)")
        if any(k in KL_ONLY_KEYS for k in keys):
            why.append("kl_mode is off")
        return [f"{', '.join(f'ppo.{k}' for k in keys)} not used: {'; '.join(why)}"]


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
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, path, overrides)) from None
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        for message in cfg.unused_settings():
            print(f"rlhfkit: warning: {path}: {message}", file=sys.stderr, flush=True)
    return cfg


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
            key = suggest_key(e["loc"])
            msg = (f"unknown key; did you mean `{key}`?" if key else
                   "unknown key (check the spelling; `rlhfkit config show CONFIG` lists every key)")
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        where = " [from command line]" if loc in override_keys else ""
        lines.append(f"  {loc}: {msg}{where}" if loc else f"  {msg}")
    return "\n".join(lines)


# Names peers (TRL, OpenRLHF, verl, HF Trainer) use for rlhfkit's keys: a key of the same section (or, with
# a dot, a path in it), or a root-level path such as wandb.project.
KEY_ALIASES = {
    "lr": "learning_rate", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size", "micro_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size", "gradient_accumulation": "gradient_accumulation_steps",
    "num_generations": "n_samples_per_prompt", "rollout_n": "n_samples_per_prompt",
    "n_samples": "n_samples_per_prompt", "ppo_mini_batch_size": "mini_batch_size",
    "num_ppo_epochs": "ppo_epochs", "train_batch_size": "rollout_batch_size", "beta": "kl_coef",
    "init_kl_coef": "kl_coef", "kl_penalty": "kl_estimator", "epsilon": "cliprange", "loss_type": "loss_aggregation",
    "max_length": "max_seq_len", "max_prompt_length": "max_prompt_len", "max_new_tokens": "sampling.max_new_tokens",
    "max_completion_length": "sampling.max_new_tokens", "temperature": "sampling.temperature",
    "actor_learning_rate": "actor.learning_rate", "critic_learning_rate": "critic.learning_rate",
    "bf16": "dtype", "wandb_project": "wandb.project", "report_to": "wandb.project", "run_name": "wandb.name",
    "output_dir": "run.output_dir",
}


def suggest_key(loc: tuple) -> str | None:
    """The valid key nearest an unknown one at `loc` (a validation error's location): a known alias, else the
    closest spelling among the section's keys (difflib), as a full dotted path; None when nothing is near."""
    found = _section_at(loc[:-1])
    if found is None:
        return None
    section, prefix = found
    unknown, names = str(loc[-1]), list(section.model_fields)
    target = KEY_ALIASES.get(unknown) or KEY_ALIASES.get(unknown.lower())
    if target and target.split(".")[0] in names:
        return ".".join([*prefix, target])
    if target and target.split(".")[0] in Config.model_fields and _section_at(tuple(target.split(".")[:-1])):
        return target
    close = difflib.get_close_matches(unknown, names, n=1, cutoff=0.6)
    return ".".join([*prefix, close[0]]) if close else None


def _section_at(loc: tuple) -> tuple[type[Section], list[str]] | None:
    """The Section class at a validation location, and its dotted path (list indices kept, the tags of
    discriminated unions such as a reward source's `python` dropped)."""
    options: list[type[Section]] = [Config]
    path: list[str] = []
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
            continue
        if len(options) > 1:  # a discriminated union (reward sources): the location names the member's tag
            options = [c for c in options if part in literal_choices(c.model_fields["type"].annotation)]
            continue
        owner = next((c for c in options if part in c.model_fields), None)
        if owner is None:
            return None
        options = section_types(owner.model_fields[part].annotation)
        path.append(part)
        if not options:
            return None
    return (options[0], path) if len(options) == 1 else None


def section_types(annotation) -> list[type[Section]]:
    """The Section classes an annotation holds: itself, the items of a list, the members of a union."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in section_types(arg)]


def save_resolved_config(cfg: Config, out_dir: Path, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config (defaults filled in) next to a stage's outputs."""
    from .paths import write_text_atomic

    out = Path(out_dir) / name
    write_text_atomic(out, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out

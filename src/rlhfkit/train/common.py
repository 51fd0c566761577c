"""What SFT, RM and DPO share around the loop: loading their data, building a trainable model, exporting."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ModelConfig, TrainConfig, save_resolved_config
from ..data.prepare import load_phase, prepare
from ..engine import distributed as D
from ..engine.backend import TrainEngine, checkpoint_dirs, param_groups, seed_everything
from ..engine.precision import DTYPES, resolve_precision, why_auto, why_stage
from ..engine.weights import gathered_weights
from ..models.configs import base_config, dense_config, model_config_for
from ..models.lora import apply_lora
from ..timing import ensure_stage
from ..models.loading import load_causal_lm, set_dropout
from .batching import Blend, collate_pairs
from ..models.finite import require_finite_weights
from .guards import guard_resume, lock_run, stage_fingerprint
from .loop import Stage
from .losses import selected_token_logprobs
from .packing import collate_pairs_packed, shared_prefix_len
from .starts import actor_source, dpo_start_model


def stage_data(cfg: Config, phase: int, show_progress: bool) -> tuple[Blend, Blend, int]:
    """The phase's train and eval rows, preparing the data first if needed (a cache hit normally).

    Each disk's first rank prepares; the others wait, then read the same files.
    """
    data_dir = cfg.output_dir / "data"
    D.init_distributed()
    if D.leads_disk(cfg.output_dir):  # each disk's first rank: every node's, when nodes have their own disks
        prepare(cfg, show_progress=show_progress)
    D.barrier()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    train = Blend([t for _, t in load_phase(data_dir, phase, "train")])
    evals = Blend([t for _, t in load_phase(data_dir, phase, "eval")])
    return train, evals, int(manifest["tokenizer"]["pad_id"])


def begin_stage(cfg: Config, out_dir: Path, stage: str) -> Config:
    """Every stage starts here: process group, precision resolved for this machine (and said), seeds
    (before any model is built), resolved config. Returns the resolved config the stage runs on."""
    ensure_stage(stage)
    D.init_distributed()
    lock_run(cfg.output_dir)
    cfg = resolve_precision(cfg)
    section = getattr(cfg, stage)
    guard_resume(out_dir, stage, stage_fingerprint(cfg, stage, stage_inputs(cfg, stage)), section.resume,
                 bool(checkpoint_dirs(out_dir)))
    seed_everything(section.seed)
    if D.is_main():
        print(f"{stage}: precision {precision_summary(cfg, stage)} (auto: {why_auto()})", flush=True)
        for where in trainable_models(cfg, stage):
            if why_stage(where):
                print(f"{stage}: {why_stage(where)}", flush=True)
        save_resolved_config(cfg, out_dir)
    return cfg


def trainable_models(cfg: Config, stage: str) -> tuple[str, ...]:
    """The config keys of the models a stage trains (RL's critic only where its estimator has one)."""
    if stage != "ppo":
        return (stage,)
    return ("ppo.actor", "ppo.critic") if cfg.ppo.uses_critic else ("ppo.actor",)


def stage_inputs(cfg: Config, stage: str) -> dict[str, str]:
    """The models a stage starts from (their identity is part of what its checkpoints depend on)."""
    if stage == "rm":
        return {"model": cfg.rm.model or cfg.model.name_or_path}
    if stage == "dpo":
        return {"model": dpo_start_model(cfg)}
    if stage == "ppo":  # not ppo.models' actor_start/reward_start: a reward given in code needs no rm/final
        p = cfg.ppo
        inputs = {"actor": actor_source(cfg)}
        reward = p.reward_model or str(cfg.output_dir / "rm" / "final")
        if uses_reward_model(p):
            inputs["reward"] = reward
        if p.uses_critic:
            inputs["critic"] = p.critic_model or reward
        return inputs
    return {"model": cfg.model.name_or_path}


def precision_summary(cfg: Config, stage: str) -> str:
    if stage != "ppo":
        return getattr(cfg, stage).dtype
    p = cfg.ppo
    return ", ".join([f"actor {p.actor.dtype}"] + ([f"critic {p.critic.dtype}"] if p.uses_critic else [])
                     + [f"reference {p.reference.dtype}"]
                     + ([f"reward {p.reward.dtype}"] if uses_reward_model(p) else []) + [f"rollouts {p.rollout_dtype}"])


def uses_reward_model(p) -> bool:
    """Whether the RL reward includes the trained reward model (a `model` source)."""
    return any(s.type == "model" for s in p.reward.sources)


def quantization_kwargs(t: TrainConfig) -> dict:
    if not t.lora.quantize_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=DTYPES[t.dtype])}


class TokenLogprobLM(nn.Module):
    """A causal LM whose forward returns the log-probs of selected target tokens (see
    losses.selected_token_logprobs; position_ids for packed rows). The loss computation goes through
    forward() so that DeepSpeed's engine, and with it ZeRO-3's parameter and gradient hooks, sees the
    whole computation."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, lengths, target_mask, temperature: float = 1.0, position_ids=None):
        return selected_token_logprobs(self.lm, input_ids, lengths, target_mask, temperature, position_ids)

    def gradient_checkpointing_enable(self, **kw):
        self.lm.gradient_checkpointing_enable(**kw)


def trainable_causal_lm(mcfg: ModelConfig, t: TrainConfig) -> tuple[TokenLogprobLM, list[dict]]:
    """Load the causal LM a stage trains (fp32 master weights; DeepSpeed casts for bf16), LoRA applied."""
    model = load_causal_lm(mcfg, dtype="float32", **quantization_kwargs(t))
    if t.lora.quantize_4bit:
        disable_cpu_4bit_repacking(model)
    if t.dropout is not None:
        set_dropout(model, t.dropout)
    if t.lora.enabled:
        model = apply_lora(model, t.lora)
    wrapped = TokenLogprobLM(model)
    return wrapped, param_groups(wrapped, t.learning_rate, t.weight_decay, {"lora_": t.lora.learning_rate})


def disable_cpu_4bit_repacking(model) -> None:
    """bitsandbytes repacks 4-bit weights into an inference-only layout on the first no-grad eval forward on
    CPUs with AVX512-BF16; afterwards LoRA gets no gradient at all. Keep the trainable layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def save_causal_lm(engine: TrainEngine, tokenizer, out: Path, t: TrainConfig) -> None:
    """HF directory: safetensors (LoRA merged, or the adapter alone), tokenizer, generation config."""
    sd = gathered_weights(engine, t, prefix="lm.")
    if not D.is_main():
        return
    require_finite_weights(sd, str(out))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = engine.module.lm
    if t.lora.enabled and t.lora.save == "adapter":
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter = get_peft_model_state_dict(module, state_dict=sd)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"))
        module.peft_config["default"].save_pretrained(str(out))
        tokenizer.save_pretrained(out)
    else:
        write_causal_lm(sd, base_config(module), tokenizer, out, getattr(module, "generation_config", None))


def write_causal_lm(sd: dict[str, torch.Tensor], config, tokenizer, out: Path, generation_config=None) -> None:
    """A loadable HF directory from a full (merged) state dict: safetensors, config, tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(dense_config(config))
    shell.save_pretrained(out, state_dict=dict(sd), safe_serialization=True)  # it empties the dict it is given
    if generation_config is not None:
        generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pair_stage(name: str, train: Blend, evals: Blend, pad_id: int, loss, export, metric_keys: tuple[str, ...],
               packing: bool = False) -> Stage:
    """A stage over preference pairs (RM, DPO): one forward on chosen + rejected rows, means over pairs;
    with packing, the rows are packed (collate_pairs_packed) and a pair's shared prefix is computed, and
    counted in the stage's tokens, once."""
    collate = collate_pairs_packed if packing else collate_pairs
    shared = (lambda r: shared_prefix_len(r["chosen_ids"], r["rejected_ids"])) if packing else (lambda r: 0)
    return Stage(
        name=name,
        train=train,
        eval=evals,
        collate=lambda rows: collate(rows, pad_id),
        units=len,
        loss=loss,
        export=export,
        eval_metrics=lambda s: {f"eval/{k}": s[k] / max(s["units"], 1) for k in metric_keys},
        tokens=lambda rows: sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) - shared(r) for r in rows),
    )

"""SFT, RM and DPO on tiny models: learning, exact resume, ZeRO on 2 gloo processes, LoRA, score position."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, needs_shared, write_jsonl
from rlhfkit.tracking import read_metrics

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "src")}


def synthetic_pairs(n: int):
    """A preference any model can learn: the chosen reply is a polite sentence, the rejected one a rude word."""
    out = []
    for i in range(n):
        out.append({"id": f"s{i}", "prompt": f"Please tell me fact number {i}.",
                    "chosen": f"Thank you for asking! Fact {i} is that water boils at one hundred degrees.",
                    "rejected": "No."})
    return out


def write_config(tmp_path: Path, data_file: Path, **sections) -> Path:
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name_or_path": "tiny-random"},
        "data": {"datasets": [{"name": "d", "path": str(data_file)}], "cache_dir": str(tmp_path / "cache"),
                 "max_seq_len": 96, "max_prompt_len": 48, "eval_fraction": 0.2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(args: list[str], nproc: int = 1, timeout: int = 600, **popen) -> subprocess.Popen:
    if nproc == 1:
        cmd = [sys.executable, "-m", "rlhfkit.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "rlhfkit.cli", *args]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_ok(args, nproc=1, timeout=600) -> str:
    p = cli(args, nproc)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def kill_when(args: list[str], marker: Path, timeout: int = 600) -> None:
    """Start `rlhfkit ARGS` and SIGKILL its whole process group the moment `marker` exists."""
    p = cli(args, start_new_session=True)
    deadline = time.time() + timeout
    while not marker.exists():
        assert p.poll() is None, "run ended before it could be killed: " + p.stdout.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(run_dir: Path, stage: str) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir / stage / "metrics.jsonl") if "train/loss" in m]


def evals(run_dir: Path, stage: str, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir / stage / "metrics.jsonl") if key in m]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))


def test_sft_eval_loss_falls_and_final_model_loads(tmp_path, pairs_file):
    from transformers import AutoModelForCausalLM

    cfg_path = write_config(tmp_path, pairs_file, data={"phase_ratios": [1, 0, 0]},
                            sft={"max_steps": 30, "micro_batch_size": 8, "learning_rate": 3e-3, "eval_every": 10})
    run_ok(["sft", str(cfg_path), "--no-progress"])
    run = tmp_path / "run"
    curve = evals(run, "sft", "eval/loss")
    assert len(curve) == 4  # before, at steps 10 and 20, after (30)
    assert curve[-1] < 0.5 * curve[0], curve
    assert evals(run, "sft", "eval/perplexity")[-1] < evals(run, "sft", "eval/perplexity")[0]
    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "final")  # plain transformers reads it
    assert model.config.num_hidden_layers == 2
    assert (run / "sft" / "resolved_config.yaml").is_file() and list((run / "sft" / "tensorboard").iterdir())


def test_dpo_implicit_reward_accuracy_rises(tmp_path, pairs_file):
    cfg_path = write_config(tmp_path, pairs_file, data={"phase_ratios": [0, 1, 0]},
                            dpo={"max_steps": 12, "micro_batch_size": 8, "learning_rate": 1e-3, "beta": 0.1})
    run_ok(["dpo", str(cfg_path), "--no-progress"])
    run = tmp_path / "run"
    acc, loss = evals(run, "dpo", "eval/rewards/accuracy"), evals(run, "dpo", "eval/loss")
    assert acc[0] == 0.0 and acc[-1] == 1.0  # policy == reference at the start: no implicit preference
    assert loss[-1] < loss[0] - 0.3


def test_rm_accuracy_rises_on_real_held_out_pairs(tmp_path):
    """Bradley–Terry on real hh-rlhf helpful pairs: held-out accuracy rises clearly above chance."""
    data = needs_shared("data/preference/hh_helpful_base_test.shared.jsonl.gz")
    cfg_path = write_config(tmp_path, data, data={"phase_ratios": [0, 1, 0], "max_seq_len": 256, "max_prompt_len": 128,
                                                  "eval_fraction": 0.2},
                            rm={"max_steps": 80, "micro_batch_size": 8, "learning_rate": 1e-3})
    run_ok(["rm", str(cfg_path), "--no-progress"])
    acc = evals(tmp_path / "run", "rm", "eval/accuracy")
    final = json.loads((tmp_path / "run" / "rm" / "final" / "eval.json").read_text())
    assert final["eval/accuracy"] == acc[-1]
    # ~380 held-out pairs: 0.58 is more than 3 standard errors above chance
    assert acc[-1] >= 0.58 and acc[-1] >= acc[0] + 0.05, acc
    stats = json.loads((tmp_path / "run" / "rm" / "final" / "reward_stats.json").read_text())
    assert stats["score_std"] > 0


def _final_weights(run_dir: Path, stage: str = "sft") -> dict:
    return load_file(str(run_dir / stage / "final" / "model.safetensors"))


def test_resume_after_sigkill_gives_the_same_final_weights(tmp_path, pairs_file):
    sft = {"max_steps": 12, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
           "save_every": 3, "warmup_steps": 2}
    straight = write_config(tmp_path / "a", pairs_file, sft=sft)
    run_ok(["sft", str(straight), "--no-progress"])

    resumed = write_config(tmp_path / "b", pairs_file, sft=sft)
    ckpt = tmp_path / "b" / "run" / "sft" / "checkpoints" / "step-0000006" / "COMPLETE"
    kill_when(["sft", str(resumed), "--no-progress"], ckpt)
    assert not (tmp_path / "b" / "run" / "sft" / "final").exists()  # it really died mid-run
    out = run_ok(["sft", str(resumed), "--no-progress"])
    assert "resumed from" in out

    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact, fp32 single process
    assert train_losses(tmp_path / "a" / "run", "sft") == train_losses(tmp_path / "b" / "run", "sft")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_gloo_processes_matches_one_process(tmp_path, pairs_file, stage):
    """Same global batch (8): one process with micro 4 × accumulation 2, vs two with micro 2 × accumulation 2."""
    common = {"max_steps": 10, "learning_rate": 3e-3, "gradient_accumulation_steps": 2}
    single = write_config(tmp_path / "one", pairs_file, sft={**common, "micro_batch_size": 4})
    run_ok(["sft", str(single), "--no-progress"])
    double = write_config(tmp_path / "two", pairs_file, sft={**common, "micro_batch_size": 2, "zero_stage": stage})
    run_ok(["sft", str(double), "--no-progress"], nproc=2)
    one, two = train_losses(tmp_path / "one" / "run", "sft"), train_losses(tmp_path / "two" / "run", "sft")
    assert len(one) == len(two) == 10
    assert max(abs(x - y) for x, y in zip(one, two)) < 1e-4, (one, two)  # stated tolerance: 1e-4 absolute
    assert one[-1] < one[0]
    a, b = _final_weights(tmp_path / "one" / "run"), _final_weights(tmp_path / "two" / "run")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_lora_merge_gives_the_same_logits_as_adapter_plus_base():
    from rlhfkit.config import LoraConfig, ModelConfig
    from rlhfkit.models import load_causal_lm
    from rlhfkit.models.lora import apply_lora, merge_lora_state_dict

    lora_cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = apply_lora(load_causal_lm(ModelConfig(name_or_path="tiny-random")), lora_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # make the adapter matter
    ids = torch.randint(0, 900, (2, 12))
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    merged_sd = merge_lora_state_dict(dict(peft_model.named_parameters()), lora_cfg.alpha / lora_cfg.r)
    plain = load_causal_lm(ModelConfig(name_or_path="tiny-random"))
    missing, unexpected = plain.load_state_dict(merged_sd, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing)
    with torch.no_grad():
        merged_logits = plain(input_ids=ids).logits
    assert (merged_logits - adapter_logits).abs().max() < 1e-5


def test_lora_sft_saves_merged_and_adapter(tmp_path, pairs_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_causal_lm

    lora = {"r": 4, "alpha": 8, "learning_rate": 1e-2}
    merged_cfg = write_config(tmp_path / "m", pairs_file, sft={"max_steps": 3, "lora": lora})
    run_ok(["sft", str(merged_cfg), "--no-progress"])
    adapter_cfg = write_config(tmp_path / "a", pairs_file, sft={"max_steps": 3, "lora": {**lora, "save": "adapter"}})
    run_ok(["sft", str(adapter_cfg), "--no-progress"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "run" / "sft" / "final")
    adapter_dir = tmp_path / "a" / "run" / "sft" / "final"
    assert (adapter_dir / "adapter_config.json").is_file()
    with_adapter = PeftModel.from_pretrained(load_causal_lm(ModelConfig(name_or_path="tiny-random")), adapter_dir)
    ids = torch.randint(0, 900, (1, 10))
    with torch.no_grad():
        # same seed, data and steps: the merged export equals the base model + the saved adapter
        assert (merged(input_ids=ids).logits - with_adapter(input_ids=ids).logits).abs().max() < 1e-5


def test_reward_score_is_the_last_real_token_under_right_padding_with_pad_eq_eos():
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer, resolve_model_dir
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.sequences import pad_right

    tok = load_tokenizer(ModelConfig(name_or_path="tiny-random"))
    rm = RewardModel.from_pretrained(resolve_model_dir("tiny-random")).eval()
    a = tok("Hello there, how are you?").input_ids + [tok.eos_token_id]
    b = tok("Hi").input_ids + [tok.eos_token_id]
    ids, lengths = pad_right([a, b], tok.pad_token_id)
    assert tok.pad_token_id == tok.eos_token_id and (ids[1, len(b):] == tok.eos_token_id).all()
    with torch.no_grad():
        scores = rm.score(ids, lengths)
        values = rm.values(ids, lengths)
        alone = [rm.score(torch.tensor([s]), torch.tensor([len(s)])).item() for s in (a, b)]
    assert scores.tolist() == pytest.approx(alone, abs=1e-5)  # padding does not change the score
    assert scores[1].item() == pytest.approx(values[1, len(b) - 1].item())  # read at b's own EOS
    assert scores[1].item() != pytest.approx(values[1, -1].item())  # not at the last (padding) position


def test_qlora_sft_trains_lora_on_4bit_base(tmp_path, pairs_file):
    """QLoRA on CPU: NF4 base weights through bitsandbytes, LoRA trained, loss falls, merged export loads."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    cfg_path = write_config(tmp_path, pairs_file, data={"phase_ratios": [1, 0, 0]},
                            sft={"max_steps": 8, "micro_batch_size": 8, "learning_rate": 1e-3, "eval_every": 4,
                                 "lora": {"r": 8, "alpha": 16, "quantize_4bit": True, "learning_rate": 1e-2}})
    run_ok(["sft", str(cfg_path), "--no-progress"])
    curve = evals(tmp_path / "run", "sft", "eval/loss")
    assert curve[-1] < curve[0] - 0.1, curve  # the eval passes in between (no-grad) did not freeze LoRA
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "sft" / "final")
    assert model.config.num_hidden_layers == 2 and "quantization_config" not in model.config.to_dict()


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, pairs_file):
    sft = {"max_steps": 3, "micro_batch_size": 8, "learning_rate": 3e-3}
    plain = write_config(tmp_path / "plain", pairs_file, sft=sft)
    ckpt = write_config(tmp_path / "ckpt", pairs_file, sft={**sft, "gradient_checkpointing": True})
    run_ok(["sft", str(plain), "--no-progress"])
    run_ok(["sft", str(ckpt), "--no-progress"])
    a, b = train_losses(tmp_path / "plain" / "run", "sft"), train_losses(tmp_path / "ckpt" / "run", "sft")
    assert len(a) == 3 and a == pytest.approx(b, abs=1e-6)


def test_param_groups_lora_lr_and_no_decay_on_biases_and_norms():
    from rlhfkit.config import LoraConfig, ModelConfig
    from rlhfkit.models import load_causal_lm
    from rlhfkit.engine.backend import param_groups
    from rlhfkit.models.lora import apply_lora

    model = apply_lora(load_causal_lm(ModelConfig(name_or_path="tiny-random")),
                       LoraConfig(r=4, only_optimize_lora=False))
    groups = param_groups(model, lr=1e-5, weight_decay=0.1, lr_by_name={"lora_": 1e-3})
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["lr"] == (1e-3 if "lora_" in name else 1e-5), name
            assert g["weight_decay"] == (0.0 if p.ndim < 2 or "norm" in name else 0.1), name
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_dropout_override_reaches_config_and_modules():
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_causal_lm
    from rlhfkit.models.loading import set_dropout

    model = load_causal_lm(ModelConfig(name_or_path="tiny-random"))
    set_dropout(model, 0.25)
    assert model.config.attention_dropout == 0.25
    assert all(layer.self_attn.attention_dropout == 0.25 for layer in model.model.layers)


def test_dpo_with_lora_uses_the_adapter_free_model_as_reference(tmp_path, pairs_file):
    cfg_path = write_config(tmp_path, pairs_file, data={"phase_ratios": [0, 1, 0]},
                            dpo={"max_steps": 8, "micro_batch_size": 8, "learning_rate": 1e-3,
                                 "lora": {"r": 8, "alpha": 16, "learning_rate": 1e-2}})
    run_ok(["dpo", str(cfg_path), "--no-progress"])
    acc = evals(tmp_path / "run", "dpo", "eval/rewards/accuracy")
    assert acc[0] == 0.0 and acc[-1] > 0.9  # adapter off == reference at the start; then it learns


def test_rm_score_stats_come_from_the_last_training_scores_without_a_scoring_pass():
    from rlhfkit.train.reward import ScoreWindow

    window = ScoreWindow(8)
    window.add(torch.arange(3.0))
    assert window.stats() is None  # under half a window: the caller scores pairs instead
    for start in (3.0, 7.0):
        window.add(torch.arange(start, start + 4))
    kept = torch.arange(3.0, 11.0, dtype=torch.float64)  # the last 8 of 0..10
    mean, std = window.stats()
    assert mean == pytest.approx(float(kept.mean())) and std == pytest.approx(float(kept.std(unbiased=False)))


def test_rm_freeze_layers_fixes_the_embeddings_and_the_lowest_layers(tmp_path, pairs_file):
    from rlhfkit.config import load_config
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.reward import build_reward_model

    cfg = load_config(write_config(tmp_path, pairs_file, rm={"freeze_layers": 1}))
    model, groups = build_reward_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("backbone.embed_tokens", "backbone.layers.0.")) for n in trainable)
    assert any(n.startswith("backbone.layers.1.") for n in trainable) and "v_head.weight" in trainable
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # the optimizer holds no frozen weight
    cfg.rm.freeze_layers = 3
    with pytest.raises(ConfigError, match="rm.freeze_layers 3: the model has 2 layers"):
        build_reward_model(cfg)


def test_rm_freeze_layers_with_lora_puts_adapters_above_the_frozen_layers_only(tmp_path, pairs_file):
    from rlhfkit.config import load_config
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.reward import build_reward_model

    cfg = load_config(write_config(tmp_path, pairs_file, rm={"freeze_layers": 1, "lora": {"r": 4}}))
    model, groups = build_reward_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if "lora_" in n}
    assert adapters and all(".layers.1." in n for n in adapters)
    assert {n for n in trainable - adapters if not n.startswith("v_head.")} == set()
    # the backward pass stops above the frozen layer: nothing below it gets a gradient
    model(torch.randint(0, 100, (2, 6)), torch.tensor([6, 4])).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".layers.0." in n or "embed_tokens" in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    cfg.rm.freeze_layers = 2
    with pytest.raises(ConfigError, match="rm.freeze_layers 2 leaves none of the model's 2 layers"):
        build_reward_model(cfg)

"""Where a stage's time goes (timing.json, pipeline.json) and whether its updates reach the compute copy."""

import json

import pytest
import torch

from rlhfkit.timing import PARTS, StageClock
from test_training import evals, pairs_file, run_ok, write_config  # noqa: F401  (pairs_file is a fixture)


def test_the_parts_of_a_stage_add_up_to_its_wall_time():
    clock = StageClock("sft")
    clock.add("train_steps", 3.0)
    clock.add("eval", 1.0)
    s = clock.summary(wall=5.0)
    assert s["seconds"]["other"] == pytest.approx(1.0)
    assert sum(s["seconds"].values()) == pytest.approx(s["wall_s"])
    assert s["share"]["train_steps"] == pytest.approx(0.6)


def test_sft_records_its_time_breakdown_and_utilisation(tmp_path, pairs_file):
    cfg = write_config(tmp_path, pairs_file, data={"phase_ratios": [1, 0, 0]},
                       sft={"max_steps": 6, "micro_batch_size": 8, "learning_rate": 1e-3, "save_every": 3})
    run_ok(["sft", str(cfg), "--no-progress"])
    t = json.loads((tmp_path / "run" / "sft" / "timing.json").read_text())
    parts = t["seconds"]
    assert set(parts) == {*PARTS, "other"}
    assert sum(parts.values()) == pytest.approx(t["wall_s"], rel=1e-9)
    for part in PARTS:  # each was timed: model loading, 6 steps, evals before and after, 2 checkpoints
        assert parts[part] > 0, part
    assert t["dtype"] == "float32" and t["peak_flops_per_s"] > 0
    assert t["achieved_flops_per_s"] == pytest.approx(t["train_flops"] / parts["train_steps"])
    assert 0 < t["utilisation"] < 2  # a lower bound of the real figure, set against one measured matmul


@pytest.mark.parametrize("lr, learns", [(1e-6, False), (1e-2, True)])
def test_the_update_figure_tells_a_stalled_bf16_run_from_a_learning_one(tmp_path, pairs_file, lr, learns):
    """Full weights in bf16: at lr 1e-6 Adam's updates are below half a bf16 step of the tiny model's weights
    (|w| ≈ 0.013), so the compute copy hardly changes and the run says so; at 1e-2 nearly every weight moves."""
    cfg = write_config(tmp_path, pairs_file, data={"phase_ratios": [1, 0, 0]},
                       sft={"max_steps": 6, "micro_batch_size": 8, "learning_rate": lr, "dtype": "bfloat16",
                            "lr_scheduler": "constant"})
    out = run_ok(["sft", str(cfg), "--no-progress"])
    changed = evals(tmp_path / "run", "sft", "precision/weights_changed")
    assert len(changed) == 6
    t = json.loads((tmp_path / "run" / "sft" / "timing.json").read_text())
    if learns:
        assert min(changed[1:]) > 0.9 and not t["updates_vanish"] and "barely learns" not in out
    else:
        assert max(changed[1:]) < 0.1 and t["updates_vanish"] and "barely learns" in out


def test_a_second_run_of_a_stage_in_one_process_gets_its_own_clock():
    from rlhfkit.timing import clock, ensure_stage, start_stage

    pipeline_clock = start_stage("rm")  # the pipeline starts the stage's clock; the stage takes it
    assert ensure_stage("rm") is pipeline_clock
    clock().add("train_steps", 5.0)
    again = ensure_stage("rm")  # the same stage run again in this process (an API user): a fresh clock
    assert again is not pipeline_clock and again.parts["train_steps"] == 0.0


def test_the_probe_skips_steps_without_an_update_and_judges_by_the_mean():
    import torch

    from rlhfkit.train.update_probe import UpdateProbe

    model = torch.nn.Linear(64, 64)
    probe, said = UpdateProbe("x", model, "bfloat16"), []
    for step in range(1, 9):
        probe.before()
        with torch.no_grad():
            if step % 2:  # odd steps change 1 of the 4096 weights; even steps none (not counted)
                model.weight[step, 0] += 1.0
        out = probe.after(step, said.append)
        assert ("precision/weights_changed" in out) == bool(step % 2)
    assert probe.summary()["weights_changed_mean"] == pytest.approx(1 / 4096) and said
    assert "per step" in said[0]


def test_frozen_lower_layers_carry_no_activation_gradients_in_the_flop_count(tmp_path, pairs_file):
    """A reward model with its lowest layer frozen (LoRA above it): the backward pass starts at layer 1, so
    the activation gradients count layer 1's linear weights and the head, not layer 0's."""
    from rlhfkit.config import load_config
    from rlhfkit.timing import linear_params, train_flops_per_token
    from rlhfkit.train.reward import build_reward_model

    cfg = load_config(write_config(tmp_path, pairs_file, rm={"lora": {"r": 4}}))
    model, _ = build_reward_model(cfg)
    total, trainable, backward = linear_params(model)
    assert backward == total and 0 < trainable < total  # LoRA in every layer: the backward reaches layer 0
    cfg.rm.freeze_layers = 1
    frozen, _ = build_reward_model(cfg)
    f_total, f_trainable, f_backward = linear_params(frozen)
    below = sum(p.numel() for n, p in frozen.named_parameters()
                if ".layers.0." in n and "lora_" not in n and n.endswith(("proj.weight", "base_layer.weight")))
    assert f_total == total - (trainable - f_trainable) and f_backward == f_total - below
    assert train_flops_per_token(frozen) == 2 * f_total + 2 * f_backward + 2 * f_trainable


def test_a_utilisation_above_the_measured_peak_says_the_peak_was_measured_under_load(tmp_path, monkeypatch):
    from rlhfkit.pipeline import time_table

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    stage = {"seconds": {"train_steps": 9.0}, "wall_s": 10.0, "dtype": "float32", "achieved_flops_per_s": 1.5e11,
             "peak_flops_per_s": 1e11, "utilisation": 1.5}
    table = time_table({"rm": stage, "sft": {**stage, "achieved_flops_per_s": 5e10, "utilisation": 0.5}})
    rm_line, sft_line = table.splitlines()[-2:]
    assert "150% of the measured matmul peak 100 GFLOP/s" in rm_line and "busy machine" in rm_line
    assert str(tmp_path / "measured_matmul_flops_float32.json") in rm_line
    assert "50% of the measured matmul peak" in sft_line and "busy" not in sft_line

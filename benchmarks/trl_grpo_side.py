"""TRL's side of benchmarks/grpo_vs_trl.py: run by that script in TRL's own virtualenv, with a JSON spec as
its one argument; prints per-iteration lines and one "RESULT {json}" line. Not meant to be run by hand."""

import importlib.metadata as md
import importlib.util
import json
import statistics
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

spec = json.loads(sys.argv[1])
n_iter = spec["warmup"] + spec["iters"]

# the reward: the same function the rlhfkit side uses, imported from benchmarks/grpo_vs_trl.py
mod_spec = importlib.util.spec_from_file_location("grpo_vs_trl", spec["reward_file"])
bench = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(bench)


def gsm8k_reward(prompts, completions, **kwargs):
    return bench.gsm8k_reward(prompts, completions)


tok = AutoTokenizer.from_pretrained(spec["model_dir"])
conversations = [[{"role": "user", "content": q}] for q in spec["questions"]]
# TRL renders these itself (apply_chat_template, add_generation_prompt): the ids must be rlhfkit's
for conv, want in zip(conversations, spec["prompt_ids"]):
    got = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    if list(got) != list(want):
        raise SystemExit(f"prompt ids differ from rlhfkit's:\n{tok.decode(got)!r}\n{tok.decode(want)!r}")

policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
n_prompts, g = len(conversations), spec["generations"]
per_step = n_prompts * g
micro = spec["micro_batch"]
cfg = GRPOConfig(
    output_dir=spec["out_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
    num_generations=g, max_completion_length=spec["new_tokens"], temperature=spec["temperature"], top_p=1.0,
    top_k=0, beta=spec["beta"], loss_type="grpo", scale_rewards="group", epsilon=0.2, num_iterations=1,
    learning_rate=spec["lr"], lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
    max_grad_norm=1.0, max_steps=n_iter, logging_steps=1, report_to=[], save_strategy="no", seed=0,
    bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0,
    disable_dropout=True, log_completions=False)
assert cfg.generation_batch_size == per_step, (cfg.generation_batch_size, per_step)
data = Dataset.from_list([{"prompt": c} for c in conversations])

gen_times, lengths, rewards = [], [], []


class Clock(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs:
            lengths.append(logs["completions/mean_length"])
            rewards.append(logs.get("reward", float("nan")))
            i = len(lengths) - 1
            if i < len(self.ends):
                prev = self.ends[i - 1] if i else self.start
                print(f"  trl iteration {i}: {self.ends[i] - prev:.2f}s (generation {gen_times[i]:.2f}), "
                      f"mean length {lengths[i]:.1f}, reward {rewards[i]:.3f}", flush=True)


clock = Clock()
trainer = GRPOTrainer(model=policy, reward_funcs=[gsm8k_reward], args=cfg, train_dataset=data,
                      processing_class=tok, callbacks=[clock])
original = trainer._generate


def timed_generate(*a, **k):
    t0 = time.perf_counter()
    out = original(*a, **k)
    gen_times.append(time.perf_counter() - t0)
    return out


trainer._generate = timed_generate
clock.start = time.perf_counter()
trainer.train()
ends = [clock.start] + clock.ends
steps = [b - a for a, b in zip(ends, ends[1:])]
w = spec["warmup"]
assert len(steps) == n_iter and len(gen_times) == n_iter and len(lengths) == n_iter, (steps, gen_times, lengths)
print("RESULT " + json.dumps({
    "side": "trl", "version": md.version("trl"), "dtype": str(policy.dtype).removeprefix("torch."),
    "versions": {"torch": torch.__version__, "transformers": md.version("transformers"),
                 "accelerate": md.version("accelerate")},
    "iterations": steps[w:], "generation_s": gen_times[w:], "mean_length": lengths[w:],
    "threads": torch.get_num_threads(), "reward_mean": statistics.mean(rewards[w:])}))

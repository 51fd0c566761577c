"""TRL's side of benchmarks/grpo_vs_trl.py: run by that script in TRL's own virtualenv, with a JSON spec as
its one argument; prints per-iteration lines and one "RESULT {json}" line. Not meant to be run by hand.

With tools (the spec's "tools": rlhfkit's built-ins, imported from its src/), GRPOTrainer runs its tool loop
(GRPOTrainer._tool_call_loop). TRL 1.16 asks two things of the tokenizer that SmolLM2's does not have: a chat
template that renders an assistant message's `tool_calls` (trl.chat_template_utils.supports_tool_calling, checked
in GRPOTrainer.__init__) and a response parser for tool calls (add_response_schema has parsers for some
templates only, and raises "Unrecognized chat template" for SmolLM2's). So the tokenizer gets SmolLM2's own
template with a `tool_calls` branch (the Hermes format that rlhfkit's calls use; every other message renders as
before) and TRL's parser for Qwen3's template (trl.chat_template_utils.qwen3_template), which reads that format."""

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
from trl.chat_template_utils import qwen3_template

spec = json.loads(sys.argv[1])
n_iter = spec["warmup"] + spec["iters"]

# the reward: the same function the rlhfkit side uses, imported from benchmarks/grpo_vs_trl.py
mod_spec = importlib.util.spec_from_file_location("grpo_vs_trl", spec["reward_file"])
bench = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(bench)


def gsm8k_reward(prompts, completions, **kwargs):
    return bench.gsm8k_reward(prompts, completions)


# SmolLM2's template writes each message as <|im_start|>role\ncontent<|im_end|>\n; an assistant message's tool calls
# are written after its content, as the model writes them
CONTENT = "message['content'] + '<|im_end|>' + '\n'}}"
TOOL_CALLS = ("message['content']}}{% if message.tool_calls is defined %}{% for call in message.tool_calls %}"
              "{{ '<tool_call>\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson) "
              "+ '\n</tool_call>' }}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}")


def with_tool_calls(template: str) -> str:
    if template.count(CONTENT) != 1:
        raise SystemExit(f"the chat template is not SmolLM2's (no {CONTENT!r} to add tool calls to):\n{template}")
    return template.replace(CONTENT, TOOL_CALLS)


def load_tools(names: list[str]) -> list:
    sys.path.insert(0, spec["rlhfkit_src"])  # stdlib-only modules: rlhfkit itself is not installed here
    from rlhfkit.agents import builtin_tools

    return [getattr(builtin_tools, name) for name in names]


tok = AutoTokenizer.from_pretrained(spec["model_dir"])
tools = load_tools(spec["tools"]) if spec["tools"] else None
system = [{"role": "system", "content": spec["system_message"]}] if tools else []
conversations = [system + [{"role": "user", "content": q}] for q in spec["questions"]]
if tools:
    tok.chat_template = with_tool_calls(tok.chat_template)
    tok.response_template = qwen3_template
# TRL renders these itself (apply_chat_template, add_generation_prompt, tools=): the ids must be rlhfkit's
for conv, want in zip(conversations, spec["prompt_ids"]):
    got = tok.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    if list(got) != list(want):
        raise SystemExit(f"prompt ids differ from rlhfkit's:\n{tok.decode(got)!r}\n{tok.decode(want)!r}")

policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
n_prompts, g = len(conversations), spec["generations"]
per_step = n_prompts * g
micro = spec["micro_batch"]
cfg = GRPOConfig(
    output_dir=spec["out_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
    num_generations=g, max_completion_length=spec["episode_tokens"] if tools else spec["new_tokens"],
    temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["beta"], loss_type="grpo", scale_rewards="group",
    epsilon=0.2, num_iterations=1,
    learning_rate=spec["lr"], lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
    max_grad_norm=1.0, max_steps=n_iter, logging_steps=1, report_to=[], save_strategy="no", seed=0,
    bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0,
    disable_dropout=True, log_completions=False,
    # with tools, max_completion_length is the episode's budget (the model's and the tools' tokens) and each turn
    # samples at most new_tokens
    **({"max_tool_calling_iterations": spec["max_turns"] - 1,
        "generation_kwargs": {"max_new_tokens": spec["new_tokens"]}} if tools else {}))
assert cfg.generation_batch_size == per_step, (cfg.generation_batch_size, per_step)
data = Dataset.from_list([{"prompt": c} for c in conversations])

gen_times, lengths, rewards = [], [], []
turn_rows = []  # per generation: model turns sampled (rows of each _generate_single_turn call, summed)
calls, valid_calls, episode_tokens = [], [], []  # per generation, per episode


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
            note = ""
            if tools:  # call_frequency: calls per episode; failure_frequency: the share of them that raised
                calls.append(logs["tools/call_frequency"])
                valid_calls.append(calls[i] * (1 - logs["tools/failure_frequency"]))
                note = bench.episode_note(episode(i))
            if i < len(self.ends):
                prev = self.ends[i - 1] if i else self.start
                print(f"  trl iteration {i}: {self.ends[i] - prev:.2f}s (generation {gen_times[i]:.2f}), "
                      f"mean length {lengths[i]:.1f}, reward {rewards[i]:.3f}{note}", flush=True)


def episode(i: int) -> dict:
    return {"turns": turn_rows[i] / per_step, "calls": calls[i], "valid_calls": valid_calls[i],
            "episode_tokens": episode_tokens[i]}


clock = Clock()
trainer = GRPOTrainer(model=policy, reward_funcs=[gsm8k_reward], args=cfg, train_dataset=data,
                      processing_class=tok, callbacks=[clock], tools=tools)
original, original_turn, original_loop = trainer._generate, trainer._generate_single_turn, trainer._tool_call_loop


def timed_generate(*a, **k):
    turn_rows.append(0)  # counted_turn adds to it (with tools)
    t0 = time.perf_counter()
    out = original(*a, **k)
    gen_times.append(time.perf_counter() - t0)
    return out


def counted_turn(prompt_ids, *a, **k):
    out = original_turn(prompt_ids, *a, **k)
    turn_rows[-1] += len(out[0])
    return out


def measured_loop(*a, **k):
    out = original_loop(*a, **k)  # its completion ids: each episode's model and tool tokens after the prompt
    episode_tokens.append(statistics.mean(len(ids) for ids in out[2]))
    return out


trainer._generate = timed_generate
if tools:
    trainer._generate_single_turn, trainer._tool_call_loop = counted_turn, measured_loop
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
    "threads": torch.get_num_threads(), "reward_mean": statistics.mean(rewards[w:]),
    **({k: [episode(i)[k] for i in range(w, n_iter)] for k in bench.EPISODE_KEYS} if tools else {})}))

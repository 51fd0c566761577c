"""Eval and chat with tools (issue 21 item 6), and a run rewarded by its environment alone.

The models are tiny-random with added tokens, each the whole text of one tool call (tests/test_agent_rl.py):
10 spellings of a call to `lookup` and 100 of a call to `search`, which no tool is. The baseline samples them
as a random model does (a call in some replies, mostly to `search`); the policy is steered: its lookup tokens'
(tied) embeddings lie along the mean direction of its final hidden states, which makes them the likeliest
tokens at every position, so it calls `lookup` with every token it writes. The policy's figures are known;
the baseline's are counted from what eval writes.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, write_jsonl
from test_agent_rl import LOOKUP, SEARCH, SECRET, TOOLS, call_model, load, prompts, spellings
from test_ppo import metrics
from test_training import ENV, run_ok, synthetic_pairs

LOOKUPS, SEARCHES = spellings(LOOKUP, 10), spellings(SEARCH, 100)


def steered(base: Path, out: Path, weights: dict[str, float]) -> Path:
    """A copy of `base` whose added token with text t has the embedding weights[t] · (the unit mean direction
    of its final hidden states); tokens not named keep theirs. A logit is that weight times the hidden
    state's component along the direction, which is positive at every position of these prompts, so a
    weight of +10 makes a token the likeliest by far."""
    if (out / "config.json").exists():
        return out
    model, tok = load(base)
    with torch.no_grad():
        hidden = model(torch.tensor(prompts(tok, 8)), output_hidden_states=True).hidden_states[-1].flatten(0, 1)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        assert (hidden @ direction).min() > 0.5  # the premise: every position has a component along it
        embeddings = model.get_input_embeddings().weight
        for text, weight in weights.items():
            embeddings[tok.convert_tokens_to_ids(text)] = weight * direction
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """policy: always calls lookup; baseline: calls now and then, mostly the unknown tool `search`."""
    tmp = tmp_path_factory.mktemp("steered")
    base = call_model(tmp / "base", LOOKUPS + SEARCHES)
    return {"policy": steered(base, tmp / "policy", dict.fromkeys(LOOKUPS, 10.0)), "baseline": base}


def eval_config(tmp_path: Path, policy, baseline, ppo: dict, **eval_section) -> Path:
    data = write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(80))
    raw = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": str(baseline)},
           "data": {"datasets": [{"name": "d", "path": str(data)}], "cache_dir": str(tmp_path / "cache"),
                    "max_seq_len": 96, "max_prompt_len": 48, "eval_fraction": 0.2, "phase_ratios": [0, 0, 1]},
           "ppo": ppo,
           "eval": {"policy": str(policy), "baseline": str(baseline), "max_prompts": 16, "batch_size": 8,
                    "sampling": {"max_new_tokens": 6, "temperature": 1.0}, **eval_section}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


TOOLS_PPO = {"tools": [f"{TOOLS}:lookup"], "max_turns": 2, "max_episode_tokens": 400,
             "reward": {"sources": [{"type": "python", "function": f"{TOOLS}:used_lookup", "name": "used_lookup"}]}}


def test_eval_runs_the_same_episodes_for_both_models_and_reports_tool_figures_with_intervals(tmp_path, models):
    """The policy calls lookup with each of its 6 tokens in both turns (the second turn's calls are not run:
    max_turns). Every figure is what generations.jsonl's episodes give, each model's and the difference with
    a paired interval; the judges score the whole episode; lengths count the model's own tokens."""
    from rlhfkit.config import load_config
    from rlhfkit.eval.compare import format_table, run_eval
    from rlhfkit.eval.report import build_report

    cfg = load_config(eval_config(tmp_path, models["policy"], models["baseline"], TOOLS_PPO,
                                  rewards=[{"type": "python", "function": f"{TOOLS}:used_lookup", "name": "used_lookup"}]))
    results = run_eval(cfg, show_progress=False)
    assert results["episodes"] == {"tools": ["lookup"], "environment": None, "max_turns": 2, "max_episode_tokens": 400,
                                   "tool_timeout_s": 10.0}
    s = results["sets"]["phase3_eval"]
    gens = [json.loads(line) for line in (cfg.output_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    assert s["prompts"] == len(gens) == 16

    # the policy: 6 valid calls in its first turn, 2 turns, the secret in every episode
    final = [g["final_episode"] for g in gens]
    assert all(e["turns"] == 2 and e["calls"] == e["valid_calls"] == 6 and e["end"] == "max_turns" for e in final)
    for fig, value in (("tool_call_rate", 1.0), ("valid_call_rate", 1.0), ("turns_per_episode", 2.0)):
        assert s[f"final_{fig}"] == value and s[f"final_{fig}_ci"] == [value, value], fig
    assert s["used_lookup_final_score"] == 1.0
    assert [g["final_length"] for g in gens] == [12] * 16  # its own tokens, not the tools' replies
    messages = final[0]["messages"]
    assert [m["role"] for m in messages] == ["model", "tool", "model"] and messages[0]["calls"] == 6
    assert messages[1]["text"].count(SECRET) == 6 and SECRET in gens[0]["final"]

    # the baseline: counted from its episodes; it calls lookup in some, the missing search tool in others
    sft = [g["sft_episode"] for g in gens]
    calls, valid = sum(e["calls"] for e in sft), sum(e["valid_calls"] for e in sft)
    assert 0 < valid < calls, sft
    assert s["sft_valid_call_rate"] == pytest.approx(valid / calls)
    assert s["sft_tool_call_rate"] == pytest.approx(np.mean([e["calls"] > 0 for e in sft]))
    assert s["sft_turns_per_episode"] == pytest.approx(np.mean([e["turns"] for e in sft]))
    assert s["used_lookup_sft_score"] == pytest.approx(np.mean([SECRET in g["sft"] for g in gens]))
    assert sum(e["errors"].get("unknown_tool", 0) for e in sft) == calls - valid
    errors = [m["text"] for e in sft for m in e["messages"] if m["role"] == "tool"]
    assert any("Error: there is no tool named 'search'. The tools are: lookup." in t for t in errors)

    # paired differences, each inside its interval; the baseline's figures vary over prompts
    for fig in ("tool_call_rate", "valid_call_rate", "turns_per_episode"):
        assert s[f"{fig}_diff"] == pytest.approx(s[f"final_{fig}"] - s[f"sft_{fig}"])
        lo, hi = s[f"{fig}_diff_ci"]
        assert lo <= s[f"{fig}_diff"] + 1e-9 and hi >= s[f"{fig}_diff"] - 1e-9 and lo < hi, fig
        lo, hi = s[f"sft_{fig}_ci"]
        assert lo < s[f"sft_{fig}"] < hi, fig

    # KL to the baseline: over the policy's own tokens, not the tool replies (where the two differ too)
    from rlhfkit.eval.compare import Comparison
    from rlhfkit.rollout.scoring import actor_logprobs
    from rlhfkit.train.common import TokenLogprobLM

    cmp = Comparison(cfg)
    [r], _ = cmp.run_episodes(cmp.policy, prompts(cmp.tokenizer, 4), [{}] * 4, 0, "test")
    diff = actor_logprobs(TokenLogprobLM(cmp.policy), r) - actor_logprobs(TokenLogprobLM(cmp.baseline), r)
    own = r.response_mask()
    torch.testing.assert_close(cmp.kl_to_baseline([r]), torch.where(own, diff, 0.0).sum(1))
    assert diff[~own].abs().sum().item() > 1.0

    text = format_table(results)
    assert "episodes: tools lookup, up to 2 turns and 400 tokens each" in text
    assert "phase3_eval episodes: tool-call rate final 1.00 [1.00, 1.00] vs SFT" in text
    page = build_report(cfg.output_dir).read_text()
    assert 'id="eval-episodes"' in page and "turns per episode" in page
    assert '<mark class="call">&lt;tool_call&gt;{&quot;name&quot;: &quot;lookup&quot;}' in page
    assert '<div class="turn tool"><span class="role">tool result</span>' in page and SECRET in page


def test_the_valid_call_rate_is_valid_calls_over_calls_and_has_no_value_without_a_call():
    """A ratio of sums (1 valid of 4 calls: 0.25, where the mean of per-episode rates would be 0.5), resampled
    on the same prompts for both models; a model without a call has none, and so has the difference."""
    from rlhfkit.eval.compare import episode_statistics
    from rlhfkit.eval.stats import Bootstrap

    final = {"turns": np.array([2.0, 2.0, 1.0]), "calls": np.array([1.0, 3.0, 0.0]), "valid_calls": np.array([1.0, 0.0, 0.0])}
    sft = {"turns": np.ones(3), "calls": np.zeros(3), "valid_calls": np.zeros(3)}
    s = episode_statistics({"final": final, "sft": sft}, Bootstrap(seed=3))
    assert s["final_valid_call_rate"] == 0.25 and s["final_tool_call_rate"] == pytest.approx(2 / 3)
    assert s["sft_valid_call_rate"] is None and s["sft_valid_call_rate_ci"] is None
    assert s["valid_call_rate_diff"] is None and s["valid_call_rate_diff_ci"] is None
    assert s["turns_per_episode_diff"] == pytest.approx(2 / 3) and s["tool_call_rate_diff"] == pytest.approx(2 / 3)
    assert s["final_valid_call_rate_ci"] == [0.0, 1.0]  # 1 resample in 27 (only the third episode) has no rate
    lo, hi = s["turns_per_episode_diff_ci"]
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    # of 2 episodes one calls: a quarter of the resamples have no call, too many for an interval
    two = {k: v[[1, 2]] for k, v in final.items()}
    s = episode_statistics({"final": two, "sft": {k: v[:2] for k, v in sft.items()}}, Bootstrap(seed=3))
    assert s["final_valid_call_rate"] == 0.0 and s["final_valid_call_rate_ci"] is None


# --- chat ------------------------------------------------------------------------------------------

def chat(model_dir: Path, tools: str, text: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", "chat", str(model_dir), "--tools", tools, "--seed", "0",
                           *flags], input=text, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_chat_runs_the_models_tool_calls_and_shows_each_call_and_result_before_it_goes_on(tmp_path, models):
    """The policy writes a lookup call with each token: both calls of its first reply are run and shown with
    the result, then it replies again; its second reply's calls are not run (--max-turns 2)."""
    p = chat(models["policy"], f"calculator,{TOOLS}:lookup", "What is the secret?\n", "--max-new-tokens", "2",
             "--max-turns", "2")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[1] == "[tools: calculator, lookup; up to 2 replies per message]"
    call = '<tool_call>{"name": "lookup"}'
    assert lines[2].count(call) == 2  # the first reply, as streamed
    assert lines[3:7] == ["[tool call] lookup({})", f"[tool result] {SECRET}"] * 2
    assert lines[7].count(call) == 2  # the model went on after reading the results
    assert lines[8] == "[2 tool call(s) not run: this was reply 2 of --max-turns 2]"


def test_chat_shows_a_failing_call_as_its_error_observation(tmp_path, models):
    """The baseline calls `search`, which no tool is: the error is shown, and the chat goes on."""
    p = chat(models["baseline"], "calculator", "hi\n" * 6, "--max-new-tokens", "8")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert ("[tool call] search({})\n[tool error: unknown_tool] Error: there is no tool named 'search'. "
            "The tools are: calculator.") in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--tools", "calculator,nothing"], "--tools[1]: 'nothing' is not a built-in tool"),
    (["--tools", "tests/agent_tools.py:missing"], "--tools[0]: "),
    (["--max-turns", "3"], "--max-turns is set, but there are no --tools to use it"),
])
def test_bad_chat_tool_flags_are_messages(models, args, message):
    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "chat", str(models["policy"]), *args], input="hi\n",
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "rlhfkit: error:" in p.stderr and message in p.stderr, p.stderr


# --- a run rewarded by its environment alone --------------------------------------------------------

ECHO_ENV = '''
class Echo:
    """Rewards a reply by its length in characters, over two steps."""

    def reset(self, metadata):
        self.steps = 0
        return [{"role": "user", "content": "Say something."}]

    def step(self, assistant_message):
        self.steps += 1
        return [{"role": "user", "content": "Once more."}], float(len(assistant_message["content"])), self.steps == 2
'''


def test_an_environment_alone_rewards_a_run_and_judges_its_eval(tmp_path):
    """ppo.reward.sources: [] with an environment: the RL loop trains on the environment's reward, and eval
    (no reward model, no eval.rewards) reports that reward for both models, and their turns."""
    (tmp_path / "envs.py").write_text(ECHO_ENV)
    ppo = {"environment": f"{tmp_path / 'envs.py'}:Echo", "max_turns": 2, "max_episode_tokens": 64, "reward": {"sources": []},
           "advantage": "grpo", "n_samples_per_prompt": 2, "rollout_batch_size": 4, "steps": 2, "eval_every": 0,
           "eval_prompts": 4, "sampling": {"max_new_tokens": 6, "temperature": 1.0},
           "actor": {"learning_rate": 1e-3, "micro_batch_size": 8}}
    cfg_file = eval_config(tmp_path, tmp_path / "run" / "ppo" / "final", "tiny-random", ppo)
    run_ok(["ppo", str(cfg_file), "--no-progress"])
    assert len(metrics(tmp_path / "run", "reward/environment")) == 2
    out = run_ok(["eval", str(cfg_file), "--no-progress"])
    results = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert results["reward_model"] is None and results["judges"] == ["environment"]
    s = results["sets"]["phase3_eval"]
    gens = [json.loads(line) for line in (tmp_path / "run" / "eval" / "generations.jsonl").read_text().splitlines()]
    for side in ("final", "sft"):
        assert s[f"environment_{side}_score"] == pytest.approx(np.mean([g[f"environment_{side}"] for g in gens]))
        assert s[f"environment_{side}_score"] > 0 and s[f"environment_{side}_score_ci"] is not None
        assert s[f"{side}_turns_per_episode"] == 2.0 and s[f"{side}_tool_call_rate"] == 0.0
        assert [m["role"] for m in gens[0][f"{side}_episode"]["messages"]] == ["model", "environment", "model"]
    assert "judged by the environment's reward (environment = " in out and "Traceback" not in out


def test_empty_reward_sources_without_an_environment_are_an_error():
    from rlhfkit.config import PPOConfig

    with pytest.raises(ValueError, match="reward.sources is empty: nothing would reward the run"):
        PPOConfig(reward={"sources": []})
    assert PPOConfig(environment="guess_number", max_turns=2, reward={"sources": []}).reward.sources == []

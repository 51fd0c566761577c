"""Multi-turn episodes in the RL loop (issue 21): the action mask, kept ids and the sampler's log-probs, tool
failures as observations, static decoding's shapes, a failing environment, chat templates that refuse tool or
environment messages, learning to call a tool, exact resume and 2 processes.

The model is tiny-random with added tokens, each the whole text of one tool call (several spellings of each,
differing in spaces): a random model calls a tool by sampling one token, as often as the number of
spellings makes it (about 1% of positions per 10 spellings), so tool use happens, can be rewarded and
learnt in a few steps. Everything else is real: the chat template, the tools, the call parser, the runner.
"""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from rlhfkit.agents.episode import continuation_ids
from rlhfkit.agents.tools import load_tools
from rlhfkit.config import ModelConfig, PPOConfig, load_config
from rlhfkit.engine.generation import SamplingConfig, StaticDecoder
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import resolve_model_dir
from rlhfkit.rollout.episodes import EpisodeRunner, episode_metrics, episode_sums
from rlhfkit.rollout.scoring import actor_logprobs
from rlhfkit.train.common import TokenLogprobLM
from rlhfkit.train.ppo.experience import LOGP_REUSE_MAX_ABS_DIFF, OwnTokens, make_experience
from test_grpo import SHARE_OF_A
from test_ppo import metrics
from test_training import cli, kill_when, run_ok, synthetic_pairs

TOOLS = REPO / "tests" / "agent_tools.py"
SECRET = "zebra-quartz-7421"  # agent_tools.lookup's answer
LOOKUP = '<tool_call>{"name": "lookup"}%s</tool_call>'
SEARCH = '<tool_call>{"name": "search"}%s</tool_call>'  # no such tool
FAILURES = {  # a spelling of a call for each error kind
    "tool_error": '<tool_call>{"name": "broken"}%s</tool_call>',
    "timeout": '<tool_call>{"name": "slow", "arguments": {"seconds": 30}}%s</tool_call>',
    "bad_arguments": '<tool_call>{"name": "slow", "arguments": {"seconds": "long"}}%s</tool_call>',
    "unknown_tool": SEARCH,
    "parse_error": '<tool_call>{"name": "lookup"%s</tool_call>',
}


def spellings(call: str, n: int) -> list[str]:
    return [call % (" " * i) for i in range(n)]


def call_model(out: Path, calls: list[str]) -> Path:
    """tiny-random with one added token per call text; new embeddings drawn as the model's own were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").exists():
        src = resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        tok.add_tokens(calls)
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """A model that calls lookup often (50 spellings) and an unknown tool sometimes (10)."""
    return call_model(tmp_path_factory.mktemp("caller"), spellings(LOOKUP, 50) + spellings(SEARCH, 10))


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": f"Please tell me fact number {i}."}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(n)]


def run_episodes(model, tok, tools: list[str], n: int = 16, max_turns: int = 2, max_tokens: int = 80,
                 timeout: float = 5.0, max_new_tokens: int = 8):
    runner = EpisodeRunner(tok, load_tools([f"{TOOLS}:{t}" for t in tools], "ppo.tools"), None, None, max_turns,
                           max_tokens, timeout, None, [tok.eos_token_id])
    r, records = runner.run(model, prompts(tok, n), [{}] * n, [f"prompt {i}" for i in range(n)], list(range(n)), 8,
                            tok.pad_token_id, [tok.eos_token_id], SamplingConfig(max_new_tokens, 1.0), True)
    return runner, r, records


# --- episodes as token ids ------------------------------------------------------------------------

def test_the_action_mask_covers_the_models_tokens_and_a_known_tool_reply_is_context(caller):
    model, tok = load(caller)
    runner, r, records = run_episodes(model, tok, ["lookup"])
    reply = continuation_ids(tok, [{"role": "tool", "name": "lookup", "content": SECRET}])  # a turn cut at 8 tokens
    called = [i for i, rec in enumerate(records) if rec.calls == rec.valid_calls == 1]
    assert len(called) >= 3, records
    for i, rec in enumerate(records):
        n, pl = int(r.response_lengths[i]), int(r.prompt_lens[i])
        response, own = r.input_ids[i, pl:pl + n].tolist(), r.action_mask[i, :n].tolist()
        assert r.input_ids[i, :pl].tolist() == runner.prompt_ids(prompts(tok, 16)[i])  # the prompt, tools described
        # the first turn's 8 sampled tokens, what the tools added, the second turn's sampled tokens
        assert own == [True] * 8 + [False] * rec.added_tokens + [True] * (rec.model_tokens - 8)
        if i in called:  # one call to lookup: its known reply, as the template writes it
            assert rec.turns == 2 and n == 16 + len(reply) and response[8:8 + len(reply)] == reply
            assert SECRET in tok.decode(response) and '{"name": "lookup"}' in tok.decode(response[:8])
        elif not rec.calls:
            assert rec.turns == 1 and n == 8
    # the loss covers the model's tokens: the response mask is the action mask within each response
    assert r.response_mask().sum().item() == sum(rec.model_tokens for rec in records)
    sums = episode_metrics(episode_sums(records))
    assert sums["tools/valid_calls_per_episode"] == pytest.approx(sum(rec.valid_calls for rec in records) / 16)


def test_kept_ids_are_not_the_re_encoded_text_and_the_actor_scores_them_as_the_sampler_did(caller):
    """Decoding an episode and encoding it again gives other ids (the random model samples pieces the
    tokenizer merges): training on re-encoded text would train on tokens that were never sampled. The
    experience is made on the kept ids, and the actor's log-probs of the model's tokens there equal the
    sampler's within the tolerance under which PPO reuses them."""
    model, tok = load(caller)
    _, r, records = run_episodes(model, tok, ["lookup"])
    changed = 0
    for i in range(len(records)):
        kept = r.input_ids[i, :int(r.lengths[i])].tolist()
        changed += tok(tok.decode(kept), add_special_tokens=False)["input_ids"] != kept
    assert changed >= 1
    actor = TokenLogprobLM(model)
    recomputed = actor_logprobs(actor, r, 1.0)
    mask = r.response_mask()
    assert (recomputed - r.logprobs).abs()[mask].max().item() <= LOGP_REUSE_MAX_ABS_DIFF
    assert (r.logprobs[~mask] == 0).all()  # nothing was sampled there
    p = PPOConfig(advantage="grpo", n_samples_per_prompt=2, kl_mode="reward", kl_coef=0.1, sampling={"temperature": 1.0})
    scores = torch.tensor([float(rec.valid_calls > 0) for rec in records])
    exp = make_experience(r, scores, actor, actor, None, p, 0.1, 4, "cpu", reuse=True, check=True)
    assert exp.rollout is r and exp.logp_gap[0] <= LOGP_REUSE_MAX_ABS_DIFF
    # advantages and KL on the model's tokens only; GRPO's advantage is the group's, the same on every token
    assert (exp.advantages[~mask] == 0).all() and (exp.kl[~mask] == 0).all()
    group = (scores.view(-1, 2) - scores.view(-1, 2).mean(1, keepdim=True)) / (scores.view(-1, 2).std(1, keepdim=True) + 1e-6)
    for i in range(len(records)):
        torch.testing.assert_close(exp.advantages[i][mask[i]], group.flatten()[i].expand(int(mask[i].sum())))


def test_gae_steps_from_the_models_last_token_of_a_turn_to_its_first_of_the_next(caller):
    """GAE over an episode: what the tool added is not a step of the model's, so the value after the last
    token of a turn is the value before the first token of the next (λ = 0: A_t = r_t + V_next − V_t)."""
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rollout.scoring import critic_values
    from rlhfkit.train.ppo.models import ValueModel

    model, tok = load(caller)
    _, r, records = run_episodes(model, tok, ["lookup"])
    i = next(i for i, rec in enumerate(records) if rec.calls == rec.valid_calls == 1)
    critic = ValueModel(RewardModel.from_pretrained(caller)).eval()
    p = PPOConfig(kl_mode="off", lam=0.0, whiten_advantages=False, sampling={"temperature": 1.0})
    scores = torch.zeros(len(records))
    scores[i] = 1.0
    actor = TokenLogprobLM(model)
    exp = make_experience(r, scores, actor, actor, critic, p, 0.0, 4, "cpu")
    values = critic_values(critic, r)[i]
    own = r.response_mask()[i].nonzero().flatten().tolist()
    last_of_turn, first_of_next, last = own[7], own[8], own[-1]
    assert first_of_next > last_of_turn + 1  # the tool's reply lies between
    assert exp.advantages[i, last_of_turn].item() == pytest.approx((values[first_of_next] - values[last_of_turn]).item(), abs=1e-5)
    assert exp.advantages[i, last].item() == pytest.approx(1.0 - values[last].item(), abs=1e-5)  # the score, no next
    assert (exp.advantages[i, last_of_turn + 1:first_of_next] == 0).all()
    assert (exp.returns[~r.response_mask()] == 0).all() and (exp.old_values[~r.response_mask()] == 0).all()


def test_an_environment_opens_the_episode_after_the_prompt_and_answers_each_turn(tiny_tokenizer):
    """guess_number: its opening message follows the prompt's user message; each reply without the secret is
    answered (context), and the episode runs to max_turns."""
    from rlhfkit.agents.environments import load_environment
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")),
                                                 dtype=torch.float32).eval()
    runner = EpisodeRunner(tok, {}, load_environment("guess_number", "ppo.environment"), "guess_number", 3, 200, 10.0,
                           None, [tok.eos_token_id])
    r, records = runner.run(model, prompts(tok, 4), [{"secret": 5000}] * 4, [f"prompt {i}" for i in range(4)],
                            list(range(4)), 4, tok.pad_token_id, [tok.eos_token_id], SamplingConfig(8, 1.0))
    opening = tok.decode(r.input_ids[0, :int(r.prompt_lens[0])])
    assert opening.endswith("<|im_start|>user\nPlease tell me fact number 0.<|im_end|>\n<|im_start|>user\nI am thinking "
                            "of a whole number from 1 to 100. Guess it: reply with one number. You have 7 guesses."
                            "<|im_end|>\n<|im_start|>assistant\n"), opening
    for i, rec in enumerate(records):
        assert rec.turns == 3 and rec.end == "max_turns" and rec.environment_reward == 0.0
        n = int(r.response_lengths[i])
        assert r.action_mask[i, :n].sum().item() == rec.model_tokens and rec.added_tokens > 0
        assert "guesses left." in tok.decode(r.input_ids[i, :int(r.lengths[i])])


def test_own_tokens_are_gathered_to_the_front_and_spread_back():
    mask = torch.tensor([[True, False, False, True, True], [False, True, True, False, False]])
    own = OwnTokens(mask)
    x = torch.arange(10.0).view(2, 5)
    assert own.lengths.tolist() == [3, 2] and own.width == 3
    assert own.gather(x)[0].tolist() == [0.0, 3.0, 4.0] and own.gather(x)[1, :2].tolist() == [6.0, 7.0]
    assert own.spread(own.gather(x)).tolist() == [[0, 0, 0, 3, 4], [0, 6, 7, 0, 0]]


def test_every_tool_failure_is_an_observation_and_a_hanging_tool_is_stopped_at_its_limit(tmp_path):
    model, tok = load(call_model(tmp_path / "model", [c for call in FAILURES.values() for c in spellings(call, 20)]
                                 + spellings(LOOKUP, 20)))
    started = time.monotonic()
    _, r, records = run_episodes(model, tok, ["lookup", "slow", "broken"], n=32, max_tokens=96, timeout=1.0)
    took = time.monotonic() - started
    sums = episode_metrics(episode_sums(records))
    for kind in FAILURES:
        assert sums[f"tools/errors/{kind}"] >= 1, (kind, sums)
    assert sums["tools/valid_calls_per_episode"] > 0
    assert took < 10, took  # `slow` sleeps 30 s: the turn's calls were given up at 1 s
    texts = [tok.decode(r.input_ids[i, :int(r.lengths[i])]) for i in range(32)]
    assert any("Error: slow did not finish within 1 s." in t for t in texts)
    assert any("Error: broken raised RuntimeError: this tool is broken" in t for t in texts)


def test_static_decoding_samples_the_dynamic_episodes_in_the_shapes_of_their_first_turn(caller):
    """ppo.rollout_decoding static (compiled is static with a compiled step): the first turn decodes in the
    static decoder's shapes, the later ones in the dynamic loop, which samples the same tokens. Before, each
    turn's live episodes (the batch) and their growing widths made a shape of its own, each a StaticCache (and on
    a GPU a compile) kept for the whole run: here (24 episodes, generation batch 8, 3 turns, 16 new tokens a
    turn) 3 shapes after the first call, 5 after the second and 8 after the fourth; now the first turn's one."""
    model, tok = load(caller)
    runner = EpisodeRunner(tok, load_tools([f"{TOOLS}:lookup"], "ppo.tools"), None, None, 3, 96, 5.0, None,
                           [tok.eos_token_id])
    static = StaticDecoder(model, compiled=False, setting="ppo.rollout_decoding")
    for step in range(2):
        args = (model, prompts(tok, 24), [{}] * 24, [f"prompt {i}" for i in range(24)],
                [100 * step + i for i in range(24)], 8, tok.pad_token_id, [tok.eos_token_id],
                SamplingConfig(16, 1.0), True)
        (a, records), (b, _) = runner.run(*args), runner.run(*args, static=static)
        assert max(rec.turns for rec in records) == 3 and len({rec.turns for rec in records}) > 1
        for key in ("input_ids", "lengths", "prompt_lens", "response_lengths", "ended", "action_mask"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert (a.logprobs - b.logprobs).abs().max() < 1e-5
    assert {batch for batch, _ in static.buffers} == {8} and len(static.buffers) <= 2, list(static.buffers)

# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(tools=["calculator"]), "set max_turns to 2 or more"),
    (dict(max_turns=3), "nothing answers the model between its turns"),
    (dict(max_episode_tokens=64), "no tools or environment to use it"),
    (dict(environment="guess_number", tool_timeout_s=3), "tool_timeout_s set, but there are no tools"),
    (dict(tools=["calculator", "calculator"], max_turns=2), "lists a tool twice"),
])
def test_episode_settings_that_would_do_nothing_are_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**settings)


# --- whole runs -----------------------------------------------------------------------------------

def tools_config(tmp_path: Path, model_dir: Path, prompts_file: Path, **ppo) -> Path:
    """GRPO with the lookup tool on the call model, rewarded for the secret in the episode (used_lookup)."""
    ppo = {"advantage": "grpo", "n_samples_per_prompt": 4, "rollout_batch_size": 8, "eval_prompts": 8,
           "sampling": {"max_new_tokens": 8, "temperature": 1.0}, "reference": {"dtype": "float32"},
           "reward": {"dtype": "float32", "sources": [{"type": "python", "function": f"{TOOLS}:used_lookup",
                                                       "name": "used_lookup"}]},
           "tools": [f"{TOOLS}:lookup"], "max_turns": 2, "max_episode_tokens": 64, **ppo}
    raw = {"run": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": str(model_dir)},
           "data": {"datasets": [{"name": "d", "path": str(prompts_file)}], "cache_dir": str(tmp_path / "cache"),
                    "max_seq_len": 96, "max_prompt_len": 48, "eval_fraction": 0.2, "phase_ratios": [0, 0, 1]},
           "ppo": ppo}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(80))


def test_grpo_learns_to_call_the_tool_that_earns_the_reward(tmp_path, prompts_file):
    """lookup is the only way to the reward. From 10 spellings of a lookup call and 10 of a call to a tool
    that does not exist, about one episode in eight calls lookup at first; 20 steps of GRPO must raise
    the valid calls per episode and the share of calls that are valid."""
    model_dir = call_model(tmp_path / "model", spellings(LOOKUP, 10) + spellings(SEARCH, 10))
    cfg = tools_config(tmp_path, model_dir, prompts_file, steps=20, eval_every=0, mini_batch_size=16,
                       kl_mode="loss", kl_coef=0.01, loss_aggregation="seq_mean_token_mean",
                       actor={"learning_rate": 1e-2, "micro_batch_size": 16})
    run_ok(["ppo", str(cfg), "--no-progress"])
    run = tmp_path / "run"
    valid = metrics(run, "tools/valid_calls_per_episode")
    rate = metrics(run, "tools/valid_call_rate")  # steps without a call have none
    reward = metrics(run, "reward/used_lookup")
    assert len(valid) == 20
    start, end = np.mean(valid[:3]), np.mean(valid[-3:])
    assert start < 0.3 and end > 2 * start + 0.2, valid
    assert np.mean(rate[-3:]) > np.mean(rate[:3]) + 0.2, rate
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.2, reward
    assert metrics(run, "eval/tools/valid_calls_per_episode")[-1] > metrics(run, "eval/tools/valid_calls_per_episode")[0]


def test_ppo_with_a_critic_trains_on_episodes(tmp_path, caller, prompts_file):
    """advantage gae: the critic's values, returns and value loss on the model's tokens of each episode."""
    cfg = tools_config(tmp_path, caller, prompts_file, advantage="gae", n_samples_per_prompt=1, critic_model=str(caller),
                       steps=2, eval_every=0, actor={"learning_rate": 1e-3, "micro_batch_size": 4},
                       critic={"learning_rate": 1e-3, "micro_batch_size": 4})
    run_ok(["ppo", str(cfg), "--no-progress"])
    run = tmp_path / "run"
    assert max(metrics(run, "tools/calls_per_episode")) > 0
    for key in ("loss/value", "val/explained_variance", "loss/policy"):
        assert len(metrics(run, key)) == 2 and all(np.isfinite(metrics(run, key))), key


def _final(run: Path) -> dict:
    return load_file(str(run / "ppo" / "final" / "model.safetensors"))


def test_multi_turn_grpo_resumes_exactly_after_sigkill(tmp_path, caller, prompts_file):
    ppo = dict(steps=6, save_every=2, eval_every=0, ppo_epochs=2, mini_batch_size=8, kl_mode="loss", kl_coef=0.05,
               actor={"learning_rate": 1e-3, "micro_batch_size": 4})
    straight = tools_config(tmp_path / "a", caller, prompts_file, **ppo)
    run_ok(["ppo", str(straight), "--no-progress"])
    resumed = tools_config(tmp_path / "b", caller, prompts_file, **ppo)
    kill_when(["ppo", str(resumed), "--no-progress"], tmp_path / "b" / "run" / "ppo" / "checkpoints" / "step-0000004" / "COMPLETE")
    assert not (tmp_path / "b" / "run" / "ppo" / "final").exists()
    assert "resumed at step 4" in run_ok(["ppo", str(resumed), "--no-progress"])
    a_run, b_run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert min(metrics(a_run, "tools/calls_per_episode")) > 0 and max(metrics(a_run, "episode/turns")) > 1
    a, b = _final(a_run), _final(b_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact: fp32, one process
    for key in ("reward/used_lookup", "loss/kl", "tools/calls_per_episode", "episode/tokens"):
        assert metrics(a_run, key) == metrics(b_run, key), key


def test_multi_turn_grpo_on_two_processes_matches_one(tmp_path, caller, prompts_file):
    """Each process runs the episodes of its whole groups with the seeds one process gives them, so the
    episodes are the same; only float summation order differs. Stated tolerance: 1e-4."""
    ppo = dict(steps=3, eval_every=0, kl_mode="loss", kl_coef=0.05, loss_aggregation="seq_mean_token_mean",
               actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    one = tools_config(tmp_path / "one", caller, prompts_file, **ppo)
    run_ok(["ppo", str(one), "--no-progress"])
    two = tools_config(tmp_path / "two", caller, prompts_file, **ppo)
    run_ok(["ppo", str(two), "--no-progress"], nproc=2)
    a_run, b_run = tmp_path / "one" / "run", tmp_path / "two" / "run"
    for key in ("tokens/generated", "tools/calls_per_episode", "tools/valid_calls_per_episode", "episode/tokens"):
        assert metrics(a_run, key) == metrics(b_run, key), key
    for key in ("reward/used_lookup", "objective/kl", "loss/policy", "loss/kl", "eval/score"):
        a, b = metrics(a_run, key), metrics(b_run, key)
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (key, a, b)
    a, b = _final(a_run), _final(b_run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_an_environment_that_raises_stops_the_run_checkpointed_and_it_resumes(tmp_path, prompts_file):
    """agent_tools.FailingEnvironment's 25th episode in a process raises in its second step: after the 8
    episodes of the first eval and two RL steps of 8, in step 3. The run stops with a message naming the
    environment and the episode, without a traceback, checkpointed at step 2; the same command resumes."""
    env = f"{TOOLS}:FailingEnvironment"
    cfg = tools_config(tmp_path, "tiny-random", prompts_file, tools=[], environment=env, max_turns=2,
                       n_samples_per_prompt=2, rollout_batch_size=4, steps=4, eval_every=0, max_episode_tokens=48,
                       reward={"sources": [{"type": "python", "function": SHARE_OF_A, "name": "share_of_a"}]},
                       actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    from test_training import cli

    p = cli(["ppo", str(cfg), "--no-progress"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert (f"ppo: step 3: environment '{env}', episode prompt" in out and "step 2: raised KeyError: 'door'" in out
            and "the run is checkpointed at step 2" in out), out[-3000:]
    run = tmp_path / "run"
    assert (run / "ppo" / "checkpoints" / "step-0000002" / "COMPLETE").is_file()
    assert len(metrics(run, "reward/environment")) == 2 and metrics(run, "episode/turns")[0] == 2.0
    out = run_ok(["ppo", str(cfg), "--no-progress"])  # a new process: steps 3 and 4 and the final eval make 24
    assert "resumed at step 2" in out and (run / "ppo" / "final" / "model.safetensors").is_file()


# --- chat templates that refuse a message ---------------------------------------------------------

# ChatML that refuses every role but system, user and assistant, as Llama-2's, Gemma's and Mistral's templates
# refuse roles they do not take (with raise_exception)
STRICT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                   "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
                   "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def strict_model(out: Path) -> Path:
    """tiny-random with STRICT_TEMPLATE as its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = STRICT_TEMPLATE
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_tools_with_a_template_that_refuses_tool_messages_are_refused_at_start(tmp_path, prompts_file):
    """Tool results are messages with the role 'tool': a template that refuses them would pass start-up and
    stop the run at the first call. It is refused before anything is trained, naming the setting and template."""
    model_dir = strict_model(tmp_path / "strict")
    p = cli(["ppo", str(tools_config(tmp_path, model_dir, prompts_file, steps=1)), "--no-progress"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert (f"ppo.tools: tools answer the model in messages with the role 'tool', and the chat template of "
            f"'{model_dir}' refuses messages with the roles 'user', 'assistant', 'tool', 'tool': TemplateError: "
            "Unknown role: tool; use a model whose chat template takes tool messages") in out, out[-3000:]
    assert not (tmp_path / "run" / "ppo" / "checkpoints").exists()


def test_an_environment_message_the_template_refuses_stops_the_run_checkpointed(tmp_path, prompts_file):
    """agent_tools.NarratingEnvironment's 25th episode in a process answers its first step with a 'narrator'
    message, in step 3 (after the first eval's 8 episodes and two steps of 8): the run stops with a message
    naming the environment, the episode and the template's refusal, without a traceback, checkpointed at step 2."""
    env = f"{TOOLS}:NarratingEnvironment"
    cfg = tools_config(tmp_path, strict_model(tmp_path / "strict"), prompts_file, tools=[], environment=env,
                       max_turns=2, n_samples_per_prompt=2, rollout_batch_size=4, steps=4, eval_every=0,
                       max_episode_tokens=48,
                       reward={"sources": [{"type": "python", "function": SHARE_OF_A, "name": "share_of_a"}]},
                       actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    p = cli(["ppo", str(cfg), "--no-progress"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert (f"ppo: step 3: environment '{env}', episode prompt" in out
            and "step 1: its messages cannot follow the model's turn: the chat template of" in out
            and "refuses messages with the roles 'user', 'assistant', 'narrator': TemplateError: Unknown role: "
                "narrator; the run is checkpointed at step 2" in out), out[-3000:]
    run = tmp_path / "run"
    assert (run / "ppo" / "checkpoints" / "step-0000002" / "COMPLETE").is_file()
    assert len(metrics(run, "reward/environment")) == 2

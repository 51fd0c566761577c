"""Issue 19's review of the reward protocol: the remote client sends each response as generated (end marker
kept) and retries 408/429 after Retry-After; serve-reward appends EOS only where a response ended, keeps
at most the model's positions and drops stalled connections; file-based reward functions get the same
module name in every process; GSM8K numbers take commas as thousands separators only."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
import torch

from conftest import needs_shared
from rlhfkit.config import FormatRewardSource
from rlhfkit.rewards.remote import backoff
from rlhfkit.rewards.sources import build_text_sources
from rlhfkit.rewards.verifiers import extract_final_number, format_reward, gsm8k_reward
from rlhfkit.rollout.sampling import Rollout
from test_rewards import FNS, FakeRewardServer, _free_port, _post, _serve, remote

PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
EOS = "<|im_end|>"


def _rollout(prompts: list[list[int]], responses: list[list[int]], eos_id: int) -> Rollout:
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids = torch.full((len(seqs), max(map(len, seqs))), eos_id)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return Rollout(ids, torch.tensor([len(s) for s in seqs]), torch.tensor([len(p) for p in prompts]),
                   torch.tensor([len(r) for r in responses]), torch.tensor([r[-1] == eos_id for r in responses]))


# --- 9a: the query is the response as generated ----------------------------------------------------

def test_remote_sends_each_response_as_generated_with_its_end_marker(tiny_tokenizer):
    from rlhfkit.rewards.sources import generated_texts

    tok = tiny_tokenizer
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ended, cut = enc("It is 4.") + [tok.eos_token_id], enc(" Let me think")
    r = _rollout([enc(PROMPT)] * 2, [ended, cut], tok.eos_token_id)
    plain = [tok.decode(x, skip_special_tokens=True) for x in (ended, cut)]  # what text sources read
    assert generated_texts(tok, r) == ["It is 4." + EOS, " Let me think"]
    with FakeRewardServer(["ok"]) as server:
        served, fmt = build_text_sources([{"type": "remote", "url": server.url},
                                          {"type": "regex", "pattern": r"4\.$"}])
        served([PROMPT] * 2, plain, [{}, {}], generated=generated_texts(tok, r))
        # OpenRLHF's clients keep special tokens: a server looking for the end marker finds it where the
        # response ended, and a response cut at max length has none
        assert server.requests[0]["query"] == [PROMPT + "It is 4." + EOS, PROMPT + " Let me think"]
        assert server.requests[0]["prompts"] == [PROMPT] * 2
    # every other source still reads the text without special tokens
    assert fmt([PROMPT] * 2, plain, [{}, {}], generated=generated_texts(tok, r)) == [1.0, 0.0]


# --- 9b, 9c: serve-reward scores as the in-process RM does ----------------------------------------

POSITIONS = 48  # the served RM's max_position_embeddings


@pytest.fixture(scope="module")
def short_rm(tmp_path_factory):
    """A tiny reward model whose config allows POSITIONS positions."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.models.reward import RewardModel

    cfg = ModelConfig(name_or_path="tiny-random")
    rm = RewardModel.from_pretrained(resolve_model_dir("tiny-random", cfg))
    config = rm.backbone.config
    config.max_position_embeddings = POSITIONS
    out = tmp_path_factory.mktemp("short_rm") / "rm"
    RewardModel.save(out, rm.state_dict(), config, 0.0, 1.0)
    load_tokenizer(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(short_rm):
    """`rlhfkit serve-reward` on short_rm with its defaults (no --max-length): its /get_reward URL."""
    port = _free_port()
    proc = _serve([str(short_rm), "--port", str(port)])
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("serving "):
                break
        assert seen and seen[-1].startswith("serving "), "".join(seen)[-3000:]
        yield f"http://127.0.0.1:{port}/get_reward"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _in_process(rm_dir, sequences: list[list[int]]) -> list[float]:
    """The RM's score of each token sequence as it is, at its last token (RewardModel.score, as PPO's
    in-process reward model scores a rollout)."""
    from rlhfkit.models.reward import RewardModel

    model = RewardModel.from_pretrained(str(rm_dir)).eval()
    with torch.no_grad():
        return [float(model.score(torch.tensor([s]), torch.tensor([len(s)]))[0]) for s in sequences]


def _tokenizer(rm_dir):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(rm_dir)))


def test_serve_reward_appends_eos_only_where_the_response_ended(served, short_rm):
    tok = _tokenizer(short_rm)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    response = " there, how are you"
    status, answer = _post(served, json.dumps({"query": [PROMPT + response + EOS, PROMPT + response],
                                               "prompts": [PROMPT, PROMPT]}).encode())
    assert status == 200, answer
    ended, cut = enc(PROMPT) + enc(response) + [tok.eos_token_id], enc(PROMPT) + enc(response)
    # a response cut at max length is scored at its last token, as the in-process RM scores it, not as if it
    # had ended
    assert answer["rewards"] == pytest.approx(_in_process(short_rm, [ended, cut]), abs=1e-5)


def test_serve_reward_keeps_at_most_the_models_positions_by_default(served, short_rm):
    tok = _tokenizer(short_rm)
    text = " ".join(["apples and oranges"] * 40)
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) > 2 * POSITIONS
    status, answer = _post(served, json.dumps({"query": [text + EOS]}).encode())
    assert status == 200, answer
    assert answer["rewards"] == pytest.approx(_in_process(short_rm, [ids[-POSITIONS:]]), abs=1e-5)


# --- 9d: a connection that stops sending is dropped ------------------------------------------------

def test_serve_reward_drops_a_connection_that_stops_sending(short_rm):
    from rlhfkit.rewards.server import RewardModelServer, make_handler

    handler = make_handler(RewardModelServer(str(short_rm), device="cpu"), str(short_rm), 1 << 20)
    # without a timeout a client that stops sending holds its thread and socket forever
    assert handler.timeout is not None and 0 < handler.timeout <= 120

    class Quick(handler):  # the same handler, on a timeout short enough to wait for here
        timeout = 0.5

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quick)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as s:
            s.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"query\"")  # 8 of the 100 bytes, then nothing
            start, answer = time.monotonic(), b""
            while chunk := s.recv(65536):
                answer += chunk
            assert time.monotonic() - start < 5
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert "stopped sending" in json.loads(body)["error"]
        with socket.create_connection(server.server_address, timeout=10) as s:  # sends nothing at all
            assert s.recv(65536) == b""  # closed by the server
    finally:
        server.shutdown()
        server.server_close()


# --- 9e: 408 and 429 are retried, after Retry-After ------------------------------------------------

def test_remote_retries_408_and_429_waiting_as_long_as_retry_after_says():
    with FakeRewardServer(["408", "ok"]) as server:
        assert remote(server.url, retries=1)(["p"], ["r"], [{}]) == [2.0]
    assert len(server.requests) == 2
    with FakeRewardServer(["429:2", "ok"]) as server:
        start = time.monotonic()
        assert remote(server.url, retries=1)(["p"], ["r"], [{}]) == [2.0]
        assert time.monotonic() - start >= 2.0  # the server's 2 s, not the 0.5 s backoff
    assert len(server.requests) == 2


def test_retry_after_is_read_in_both_forms_and_bounded():
    from rlhfkit.rewards.remote import RETRY_AFTER_MAX_S, retry_delay

    assert retry_delay(1, None) == backoff(1) and retry_delay(3, "not a number") == backoff(3)
    assert retry_delay(1, "3") == 3.0 and retry_delay(1, "0") == 0.0
    assert retry_delay(1, "100000") == RETRY_AFTER_MAX_S  # a server cannot stall training for a day
    assert retry_delay(1, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 10))
    assert 8.0 <= retry_delay(1, soon) <= 10.0


# --- 11a: file-based reward functions ---------------------------------------------------------------

def test_a_reward_file_gets_the_same_module_name_in_every_process():
    spec = f"{FNS}:length"
    code = f"from rlhfkit.rewards.sources import load_function; print(load_function({spec!r}, 'x').__module__)"
    names = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        names.add(done.stdout.strip())
    # other processes (data-loader workers, another rank unpickling) find the module by this name
    assert len(names) == 1, names


# --- 11b: commas are thousands separators ----------------------------------------------------------

@pytest.mark.parametrize("text, number", [
    ("#### 3,5", "3"),  # not 35
    ("the numbers 1,2,3", "3"),  # a list, not 123
    ("#### 1,200", "1200"),
    ("she paid $12,345,678.50 in all", "12345678.5"),
    ("#### -1,000", "-1000"),
])
def test_commas_are_read_as_thousands_separators_only(text, number):
    assert extract_final_number(text) == number


def test_format_default_pattern_takes_commas_as_thousands_separators_only():
    default = FormatRewardSource(type="format").pattern
    (source,) = build_text_sources([{"type": "format"}])
    for pattern in (default, None):
        check = (lambda r: format_reward(r)) if pattern is None else (lambda r: format_reward(r, pattern))
        assert check("#### 3,5") == 0.0 and check("#### 1,2") == 0.0
        assert check("#### 1,200") == check("#### -1,200.5") == check("#### 72") == check("#### .5") == 1.0
    assert source(["p"] * 2, ["#### 3,5", "#### 1,200"], [{}, {}]) == [0.0, 1.0]
    assert gsm8k_reward("#### 3,5", "35") == 0.0
    from rlhfkit.rewards.verifiers import FORMAT_PATTERN

    assert default == FORMAT_PATTERN  # the config's default and format_reward's are the same pattern


def test_every_real_gsm8k_answer_is_read_back():
    path = needs_shared("data/eval/gsm8k_test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    answers = [r["final_answer"] for r in rows]
    assert any("," in a for a in answers)  # "1,200" and the like
    for row, answer in zip(rows, answers):
        assert gsm8k_reward(row["reference"], answer) == 1.0, row["reference"][-80:]
        assert gsm8k_reward(f"so the answer is #### {answer}", answer) == 1.0, answer
        assert format_reward(f"... #### {answer}\n") == 1.0, answer

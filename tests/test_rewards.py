"""rlhfkit.rewards: the verifiers by hand, every text source's checks (counts, NaN, exceptions, missing
metadata), python functions by module and by path, the remote client against a real local HTTP server
(retries, timeouts, both answer forms) and `rlhfkit serve-reward` as a real process."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO
from rlhfkit.errors import ConfigError
from rlhfkit.rewards.remote import backoff
from rlhfkit.rewards.sources import RewardError, build_text_sources
from rlhfkit.rewards.verifiers import (exact_reward, extract_final_number, format_reward, gsm8k_reward, numbers_equal,
                                       regex_reward)

FNS = REPO / "tests" / "reward_fns.py"


# --- verifiers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, number", [
    ("so the answer is #### 1,000", "1000"),
    ("She pays $18.00.", "18"),
    ("$18.00", "18"),
    ("no number here", None),
    ("-3", "-3"),
    ("it is 72.0.", "72"),
    ("3 apples and 4 pears, 7 in all", "7"),
    ("first 5 then #### 12 and later 99", "12"),  # the number after the last ####, not the last number
    ("#### 1 ... #### $2,500.50 total", "2500.5"),
    ("#### nothing after", None),
    ("half is .5", "0.5"),
])
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_numbers_equal_and_gsm8k_reward():
    assert numbers_equal("1,000", "1000") and numbers_equal("0.50", ".5") and numbers_equal("$18.00", "18")
    assert numbers_equal("-3", "-3.0") and not numbers_equal("3", "-3") and not numbers_equal("x", "x")
    assert gsm8k_reward("so the answer is #### 1,000", "1000") == 1.0
    assert gsm8k_reward("so the answer is #### 1,000", 1000) == 1.0  # a JSON number in the record
    assert gsm8k_reward("She pays $18.00.", "18") == 1.0
    assert gsm8k_reward("I do not know", "18") == 0.0
    assert gsm8k_reward("#### 17", "18") == 0.0


def test_exact_regex_and_format():
    assert exact_reward("  Paris\n", "Paris ") == 1.0 and exact_reward("paris", "Paris") == 0.0
    assert regex_reward("the answer is B.", r"\b[A-D]\.") == 1.0 and regex_reward("none", r"\b[A-D]\.") == 0.0
    assert format_reward("3 + 4 = 7\n#### 7\n") == 1.0  # stripped first: a trailing newline is fine
    assert format_reward("#### 7, I think") == 0.0 and format_reward("7") == 0.0
    assert format_reward("#### -1,200.5") == 1.0


# --- text sources ----------------------------------------------------------------------------------

def test_sources_are_named_by_type_numbered_when_repeated_and_model_is_skipped():
    sources = build_text_sources([
        {"type": "model"}, {"type": "gsm8k"}, {"type": "format", "weight": 0.5},
        {"type": "python", "function": f"{FNS}:length"}, {"type": "python", "function": f"{FNS}:says_yes"},
        {"type": "regex", "pattern": "yes", "name": "polite"}])
    assert [(s.name, s.type, s.weight) for s in sources] == [
        ("gsm8k", "gsm8k", 1.0), ("format", "format", 0.5), ("python", "python", 1.0),
        ("python_2", "python", 1.0), ("polite", "regex", 1.0)]
    responses = ["yes, #### 4", "no: 5"]
    meta = [{"final_answer": "4"}, {"final_answer": 4}]
    assert [s(["p1", "p2"], responses, meta) for s in sources] == [
        [1.0, 0.0], [1.0, 0.0], [11.0, 5.0], [1.0, 0.0], [1.0, 0.0]]


def test_sources_from_the_config_classes():
    from rlhfkit.config import PPORewardConfig

    cfg = PPORewardConfig.model_validate({"sources": [{"type": "model", "weight": 0.5},
                                                      {"type": "gsm8k", "name": "correct", "weight": 2.0}]})
    (source,) = build_text_sources(cfg.sources)
    assert (source.name, source.type, source.weight) == ("correct", "gsm8k", 2.0)
    assert source(["p"], ["#### 3"], [{"final_answer": "3.0"}]) == [1.0]


def test_python_source_by_module_and_by_relative_path(monkeypatch):
    monkeypatch.chdir(REPO)
    by_module = build_text_sources([{"type": "python", "function": "reward_fns:length"}], base_dir=REPO / "tests")
    by_path = build_text_sources([{"type": "python", "function": "tests/reward_fns.py:length"}])
    assert by_module[0](["p"], ["abc"], [{}]) == by_path[0](["p"], ["abc"], [{}]) == [3.0]


@pytest.mark.parametrize("function, message", [
    ("reward_fns:nope", r"ppo\.reward\.sources\[0\]\.function: module reward_fns has no function 'nope'"),
    ("reward_fns.py:nope", r"ppo\.reward\.sources\[0\]\.function: .*reward_fns\.py has no function 'nope'"),
    ("no_such_module_xyz:f", r"ppo\.reward\.sources\[0\]\.function: cannot import module 'no_such_module_xyz'"),
    ("missing.py:f", r"ppo\.reward\.sources\[0\]\.function: file .*missing\.py not found"),
    ("reward_fns:NOT_CALLABLE", r"'NOT_CALLABLE' in module reward_fns is not a function"),
])
def test_a_missing_python_function_is_a_config_error_naming_the_setting(monkeypatch, function, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=message):
        build_text_sources([{"type": "python", "function": function}], base_dir=REPO / "tests")


def test_config_errors_for_patterns_and_names():
    with pytest.raises(ConfigError, match=r"sources\[0\]\.pattern: not a valid regular expression"):
        build_text_sources([{"type": "regex", "pattern": "(unclosed"}])
    with pytest.raises(ConfigError, match="two sources are named 'x'"):
        build_text_sources([{"type": "format", "name": "x"}, {"type": "gsm8k", "name": "x"}])
    with pytest.raises(ConfigError, match=r"eval\.rewards\[0\]\.function"):
        build_text_sources([{"type": "python", "function": f"{FNS}:nope"}], setting="eval.rewards")


@pytest.mark.parametrize("fn, message", [
    ("one_short", r"reward source 'python' \(python .*:one_short\) returned 2 values for 3 responses"),
    ("not_a_number", r"reward source 'python' .* returned a non-finite value \(nan\) for response 0"),
    ("broken", r"reward source 'python' .*:broken\) raised KeyError: 'score_me'"),
    ("text_values", r"reward source 'python' .* must return a list of numbers"),
])
def test_every_call_is_checked_and_the_error_names_the_source(fn, message):
    source = build_text_sources([{"type": "python", "function": f"{FNS}:{fn}"}])[0]
    with pytest.raises(RewardError, match=message) as e:
        source(["a", "b", "c"], ["x", "y", "z"], [{}, {}, {}])
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


def test_a_missing_metadata_key_names_the_key_the_source_and_the_record():
    gsm8k, exact = build_text_sources([{"type": "gsm8k", "name": "correct"}, {"type": "exact", "answer_key": "ref"}])
    with pytest.raises(RewardError, match=r"reward source 'correct' .*prompt record 1 of the batch has no metadata "
                                          r"field 'final_answer' .*every prompt record must carry"):
        gsm8k(["p", "q"], ["#### 1", "#### 2"], [{"final_answer": "1"}, {"answer": "2"}])
    with pytest.raises(RewardError, match=r"reward source 'exact' .*record 0 .*field 'ref'"):
        exact(["p"], ["x"], [{}])


# --- the remote client against a real local server --------------------------------------------------

class FakeRewardServer:
    """A tiny reward server on 127.0.0.1 (a free port) in a thread. `plan` is a list of behaviours, one per
    request, the last repeated: "ok" (rewards = len(query)), "list" (a bare JSON list), "500", "400", "408",
    "429", "429:N" (with Retry-After: N), "hang" (answers nothing for 10 s)."""

    def __init__(self, plan: list[str]):
        self.plan, self.requests = list(plan), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                what = fake.plan.pop(0) if len(fake.plan) > 1 else fake.plan[0]
                if what == "hang":
                    time.sleep(10)
                    return
                if what.split(":")[0] in ("500", "400", "408", "429"):  # "429:2": with Retry-After: 2
                    status, _, retry_after = what.partition(":")
                    self._send(int(status), {"error": "scripted failure"}, retry_after)
                    return
                rewards = [float(len(q)) for q in body["query"]]
                self._send(200, rewards if what == "list" else {"rewards": rewards, "scores": rewards,
                                                               "extra_logs": {"n": len(rewards)}})

            def _send(self, status, payload, retry_after=""):
                data = json.dumps(payload).encode()
                self.send_response(status)
                if retry_after:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/get_reward"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def remote(url: str, **settings):
    return build_text_sources([{"type": "remote", "url": url, **settings}])[0]


@pytest.mark.parametrize("form", ["ok", "list"])
def test_remote_sends_openrlhf_json_in_batches_and_reads_both_answer_forms(form):
    prompts, responses = ["P1:", "P2:", "P3:"], ["a", "bb", "ccc"]
    meta = [{"gold": "x"}, {"gold": "y"}, {"gold": None}]
    with FakeRewardServer([form]) as server:
        rewards = remote(server.url, batch_size=2, label_key="gold")(prompts, responses, meta)
    assert rewards == [4.0, 5.0, 6.0]
    assert server.requests == [{"query": ["P1:a", "P2:bb"], "prompts": ["P1:", "P2:"], "labels": ["x", "y"]},
                               {"query": ["P3:ccc"], "prompts": ["P3:"], "labels": [None]}]


def test_remote_without_label_key_sends_null_labels_and_a_missing_label_is_an_error():
    with FakeRewardServer(["ok"]) as server:
        assert remote(server.url)(["p"], ["r"], [{}]) == [2.0]
        assert server.requests[0]["labels"] == [None]
        with pytest.raises(RewardError, match=r"record 0 .*field 'gold'"):
            remote(server.url, label_key="gold")(["p"], ["r"], [{}])


def test_remote_retries_a_500_then_succeeds():
    with FakeRewardServer(["500", "ok"]) as server:
        assert remote(server.url, retries=2)(["p"], ["r"], [{}]) == [2.0]
    assert len(server.requests) == 2


def test_remote_gives_up_after_its_retries_in_bounded_time():
    assert [backoff(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 5.0]
    with FakeRewardServer(["500"]) as server:
        start = time.monotonic()
        with pytest.raises(RewardError, match=rf"reward source 'remote': reward server {server.url} did not "
                                              r"answer after 3 tries \(HTTP 500: scripted failure\)"):
            remote(server.url, retries=2)(["p"], ["r"], [{}])
        assert time.monotonic() - start < 1.5 + 1.0  # 0.5 s + 1 s of backoff
    assert len(server.requests) == 3


def test_remote_does_not_retry_a_4xx():
    with FakeRewardServer(["400"]) as server:
        with pytest.raises(RewardError, match=r"refused the request \(HTTP 400: scripted failure\)"):
            remote(server.url, retries=3)(["p"], ["r"], [{}])
    assert len(server.requests) == 1


def test_remote_times_out_and_gives_up_in_bounded_time():
    with FakeRewardServer(["hang"]) as server:
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"did not answer after 2 tries \(timed out after 0.5 s\)"):
            remote(server.url, timeout=0.5, retries=1)(["p"], ["r"], [{}])
        assert time.monotonic() - start < 0.5 + 0.5 + 0.5 + 1.0


def test_remote_to_a_closed_port_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/get_reward"
    with pytest.raises(RewardError, match=rf"reward server {url} did not answer after 1 try \(.*refused"):
        remote(url, retries=0)(["p"], ["r"], [{}])


# --- rlhfkit serve-reward as a real process ---------------------------------------------------------

@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny reward model on disk (random backbone and head), as `rlhfkit rm` would leave it."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.models.reward import RewardModel

    cfg = ModelConfig(name_or_path="tiny-random")
    rm = RewardModel.from_pretrained(resolve_model_dir("tiny-random", cfg))
    out = tmp_path_factory.mktemp("rewards") / "rm"
    RewardModel.save(out, rm.state_dict(), rm.backbone.config, 0.0, 1.0)
    load_tokenizer(cfg).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "rlhfkit"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([str(exe), "serve-reward", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO, start_new_session=True)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _in_process_scores(rm_dir: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """The same RM scored here, one sequence at a time (no padding): prompt and response tokenized apart,
    EOS appended, the score at that EOS."""
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer
    from rlhfkit.models.reward import RewardModel

    tok = load_tokenizer(ModelConfig(name_or_path=str(rm_dir)))
    model = RewardModel.from_pretrained(str(rm_dir)).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = tok(p, add_special_tokens=False)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
            ids = ids + [tok.eos_token_id]
            out.append(float(model.score(torch.tensor([ids]), torch.tensor([len(ids)]))[0]))
    return out


def test_serve_reward_scores_like_the_model_in_process_and_answers_errors_in_json(rm_dir):
    port = _free_port()
    proc = _serve([str(rm_dir), "--host", "127.0.0.1", "--port", str(port), "--batch-size", "2",
                   "--max-request-bytes", "4096"])
    try:
        seen = []
        for line in proc.stdout:  # wait for the ready line
            seen.append(line)
            if line.startswith("serving "):
                break
        assert seen and seen[-1].strip() == (f"serving {rm_dir} on http://127.0.0.1:{port} "
                                             "(POST /get_reward, GET /health)"), "".join(seen)[-3000:]
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/health", timeout=30) as answer:
            assert json.loads(answer.read()) == {"status": "ok", "model": str(rm_dir)}

        prompts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Hi", "Hello there, how"]
        responses = ["It is 4.", " there", " are you doing today? Fine, thanks!"]
        # the client the trainer uses: one request of 3 rows, scored by the server in a padded batch of 2 and one of 1;
        # every response ended, so as generated each ends in EOS
        generated = [r + "<|im_end|>" for r in responses]
        served = remote(f"{base}/get_reward", batch_size=3)(prompts, responses, [{}, {}, {}], generated=generated)
        expected = _in_process_scores(rm_dir, prompts, responses)
        assert served == pytest.approx(expected, abs=1e-5)
        status, answer = _post(f"{base}/get_reward", json.dumps({"query": [p + r for p, r in zip(prompts, responses)]}).encode())
        assert status == 200 and answer["scores"] == answer["rewards"] and len(answer["rewards"]) == 3

        status, answer = _post(f"{base}/get_reward", b"x" * 5000)
        assert status == 413 and "--max-request-bytes" in answer["error"]
        with pytest.raises(RewardError, match=r"refused the request \(HTTP 413: the request is \d+ bytes"):
            remote(f"{base}/get_reward", retries=3)(["p" * 4000], ["r"] * 1, [{}])
        status, answer = _post(f"{base}/get_reward", b"x" * (4 << 20))  # more than the sockets buffer
        assert status == 413
        status, answer = _post(f"{base}/get_reward", b"{not json")
        assert status == 400 and "not JSON" in answer["error"]
        status, answer = _post(f"{base}/get_reward", json.dumps({"prompts": ["a"]}).encode())
        assert status == 400 and '"query"' in answer["error"]
        status, answer = _post(f"{base}/get_reward", json.dumps({"query": [1, 2]}).encode())
        assert status == 400 and '"query"' in answer["error"]
        status, answer = _post(f"{base}/get_reward", json.dumps({"query": ["a"], "prompts": ["a", "b"]}).encode())
        assert status == 400 and '"prompts"' in answer["error"]
        with urllib.request.urlopen(f"{base}/health", timeout=30):  # still up after the bad requests
            pass

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out and "stopped" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of its process group is left


def test_serve_reward_on_a_directory_that_is_not_a_reward_model_exits_2(tmp_path):
    proc = _serve([str(tmp_path / "nowhere"), "--port", str(_free_port())])
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "rlhfkit: error: serve-reward:" in out and "is not a directory" in out, out

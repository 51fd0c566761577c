"""The OpenEnv client (`ppo.environment: openenv`): episodes against a real OpenEnv server (openenv-core's own
server classes, served on 127.0.0.1 by uvicorn in a subprocess), servers that are down or answer garbage,
and the settings.

openenv-core is not one of rlhfkit's dependencies: it requires gradio, and every gradio it accepts conflicts
with constraints.txt (its pins of markupsafe, pandas, huggingface_hub or pillow; docs/agents.md). The server
runs under the Python that RLHFKIT_OPENENV_PYTHON names (a virtualenv with `pip install openenv-core==0.3.0`),
or this one where openenv is importable; the tests that need it skip otherwise. The client needs no openenv.
"""

import base64
import hashlib
import os
import socket
import subprocess
import sys
import threading

import pytest

from rlhfkit.agents.environments import EnvironmentEpisode, EpisodeError, load_environment
from rlhfkit.config import OpenEnvConfig, PPOConfig
from rlhfkit.errors import ConfigError

# A small OpenEnv environment, served with openenv's own classes: count down from reset's `start`, one number a
# step; a right number earns 1, a wrong one no reward (None); done at 0. `boom` as the message raises.
SERVER = '''
import socket, sys
import uvicorn
from openenv.core.env_server.http_server import create_fastapi_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State


class CountAction(Action):
    message: str


class CountObservation(Observation):
    prompt: str = ""


class Countdown(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def reset(self, seed=None, episode_id=None, start: int = 3, **kwargs):
        self.next = int(start)
        return CountObservation(prompt=f"Count down from {self.next}.")

    def step(self, action):
        if action.message == "boom":
            raise RuntimeError("the counter broke")
        right = action.message.strip() == str(self.next)
        self.next -= 1
        return CountObservation(prompt="" if self.next == 0 else ("ok" if right else "wrong"),
                                reward=1.0 if right else None, done=self.next == 0)

    @property
    def state(self):
        return State()


app = create_fastapi_app(Countdown, CountAction, CountObservation, max_concurrent_envs=int(sys.argv[1]))
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(64)  # connections wait in the backlog until uvicorn accepts them
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
'''
OPENENV_PYTHON = os.environ.get("RLHFKIT_OPENENV_PYTHON", sys.executable)
MAX_SESSIONS = 8


def _has_openenv() -> bool:
    return subprocess.run([OPENENV_PYTHON, "-c", "import openenv.core, uvicorn"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The Countdown server's URL: at most MAX_SESSIONS sessions at once. Its log goes to a file (a pipe nobody
    reads would stop it once full)."""
    if not _has_openenv():
        pytest.skip(f"openenv-core is not importable by {OPENENV_PYTHON}: set RLHFKIT_OPENENV_PYTHON to a Python "
                    "with openenv-core 0.3.0 (not a dependency: each gradio it takes conflicts with constraints.txt)")
    log = tmp_path_factory.mktemp("openenv") / "server.log"
    with open(log, "w") as err:
        p = subprocess.Popen([OPENENV_PYTHON, "-c", SERVER, str(MAX_SESSIONS)], stdout=subprocess.PIPE, stderr=err,
                             text=True)
    try:
        port = p.stdout.readline().strip()
        assert port, log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]  # every session ended cleanly


def episode(url: str, name: str = "prompt 0, sample 0", **settings) -> EnvironmentEpisode:
    settings = OpenEnvConfig(url=url, **{"observation_field": "prompt", **settings})
    return EnvironmentEpisode(load_environment("openenv", "ppo.environment", openenv=settings), "openenv", name)


def say(text):
    return {"role": "assistant", "content": text}


def user(text):
    return {"role": "user", "content": text}


# --- a real OpenEnv server ------------------------------------------------------------------------

def test_episodes_on_an_openenv_server_keep_their_own_state(server):
    """reset's data is the record's metadata (the server passes on what reset takes), the reply goes as the
    Action's message, the Observation's prompt comes back as a user message; no reward is 0, and done closes
    the session. Two episodes at once are two sessions."""
    a, b = episode(server), episode(server, "prompt 1, sample 0")
    assert a.reset({"start": 2, "prompt_id": "x"}) == [user("Count down from 2.")]
    assert b.reset({"start": 1}) == [user("Count down from 1.")]
    assert a.step(say("2")) == ([user("ok")], 1.0, False)
    assert b.step(say(" 1\n")) == ([], 1.0, True)  # an empty observation is no message
    assert a.step(say("7")) == ([], 0.0, True)
    assert (a.steps, a.reward, a.done) == (2, 1.0, True)


def test_finished_episodes_free_their_sessions(server):
    """A session ends when its episode is done, or dropped unfinished: many more episodes than the server
    holds at once run one after another."""
    for i in range(2 * MAX_SESSIONS):
        e = episode(server, f"prompt {i}")
        e.reset({"start": 1})
        if i % 2:
            assert e.step(say("1"))[2]
        del e


def test_more_episodes_at_once_than_the_server_holds_is_an_episode_error(server):
    held = [episode(server, f"prompt {i}") for i in range(MAX_SESSIONS)]
    for e in held:
        e.reset({})
    with pytest.raises(EpisodeError) as err:
        episode(server, "prompt 8, sample 0").reset({})
    assert str(err.value).startswith("environment 'openenv', episode prompt 8, sample 0, reset: raised OpenEnvError: "
                                     "the server at ws://127.0.0.1:")
    assert f"it holds at most {MAX_SESSIONS} at once" in str(err.value) and "max_concurrent_envs" in str(err.value)
    held.clear()  # their sessions end now, not when the garbage collector frees the frame that err holds


@pytest.mark.parametrize("settings, call, message", [
    (dict(observation_field="text"), "reset",
     "the observation has no field 'text' (ppo.openenv.observation_field); its fields: ['prompt']"),
    (dict(action_field="answer"), "step 1",
     "the server refused the action {'answer': '3'} (message: Field required; answer: Extra inputs are not "
     "permitted); ppo.openenv.action_field names the Action's field that carries the reply"),
])
def test_settings_that_do_not_fit_the_server_name_themselves(server, settings, call, message):
    e = episode(server, **settings)
    with pytest.raises(EpisodeError) as err:
        e.reset({})
        e.step(say("3"))
    where = f"environment 'openenv', episode prompt 0, sample 0, {call}"
    assert str(err.value) == f"{where}: raised OpenEnvError: {message}"


def test_an_environment_that_raises_on_the_server_is_an_episode_error(server):
    e = episode(server)
    e.reset({})
    with pytest.raises(EpisodeError) as err:
        e.step(say("boom"))
    assert str(err.value) == ("environment 'openenv', episode prompt 0, sample 0, step 1: raised OpenEnvError: the "
                              "server answered step with an error (EXECUTION_ERROR): the counter broke")


def test_grpo_trains_on_episodes_of_the_openenv_server(server, tmp_path):
    """Two GRPO steps on tiny-random, every episode a session on the server (8 at once: as many as it holds):
    the run ends, and logs the environment's reward and two turns per episode (a countdown from 3 outlasts 2)."""
    from test_agent_rl import tools_config
    from test_ppo import metrics
    from test_training import run_ok, synthetic_pairs

    from conftest import write_jsonl

    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", synthetic_pairs(40))
    cfg = tools_config(tmp_path, "tiny-random", prompts_file, tools=[], environment="openenv",
                       openenv={"url": server, "observation_field": "prompt"}, reward={"sources": []},
                       n_samples_per_prompt=2, rollout_batch_size=4, steps=2, eval_every=0, eval_prompts=0,
                       actor={"learning_rate": 1e-3, "micro_batch_size": 8})
    run_ok(["ppo", str(cfg), "--no-progress"])
    run = tmp_path / "run"
    assert len(metrics(run, "reward/environment")) == 2
    assert metrics(run, "episode/turns") == [2.0, 2.0] and metrics(run, "episode/end_max_turns") == [1.0, 1.0]


# --- servers that are down or answer garbage (no openenv needed) ----------------------------------

def test_a_server_that_is_down_is_an_episode_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it is closed
    with pytest.raises(EpisodeError) as err:
        episode(f"http://127.0.0.1:{port}").reset({})
    assert str(err.value).startswith(
        f"environment 'openenv', episode prompt 0, sample 0, reset: raised OpenEnvError: cannot connect to the "
        f"OpenEnv server at ws://127.0.0.1:{port}/ws (ppo.openenv.url): ConnectionRefusedError")


def _frame(text: bytes) -> bytes:
    return bytes([0x81, len(text)]) + text  # a server's final text frame, unmasked (short texts only)


def _upgrade(request: bytes) -> bytes:
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


@pytest.fixture
def garbage_server():
    """Serves one connection on 127.0.0.1 with `answer(request) -> bytes` (sent once the request is read, then
    the connection stays open until the test ends); returns the URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns = []

    def serve(answer):
        conn, _ = listener.accept()
        conns.append(conn)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        conn.sendall(answer(request))

    def start(answer):
        threading.Thread(target=serve, args=(answer,), daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for c in conns:
        c.close()
    listener.close()


@pytest.mark.parametrize("answer, message", [
    (lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
     "cannot connect to the OpenEnv server at ws://127.0.0.1:{port}/ws (ppo.openenv.url): it did not accept a "
     "WebSocket connection (is it an OpenEnv server?): it answered 'HTTP/1.1 200 OK'"),
    (lambda r: _upgrade(r) + _frame(b"<html>"),
     "the server at ws://127.0.0.1:{port}/ws answered reset with something that is not JSON: Expecting value: "
     "line 1 column 1 (char 0)"),
    (lambda r: _upgrade(r) + _frame(b'{"hello": 1}'),
     "the server at ws://127.0.0.1:{port}/ws answered reset outside the OpenEnv protocol (not {{\"type\": "
     "\"observation\", \"data\": {{\"observation\": {{...}}, ...}}}}): {{'hello': 1}}"),
    (lambda r: _upgrade(r) + _frame(b'{"type": "observation", "data": {"observation": {"prompt": "hi"}, '
                                    b'"reward": "high"}}'),
     "the server answered reset with a reward that is not a number: 'high'"),
    (lambda r: _upgrade(r),
     "no answer from the OpenEnv server at ws://127.0.0.1:{port}/ws: no answer within 0.5 s (ppo.openenv.timeout)"),
])
def test_a_server_that_answers_garbage_is_an_episode_error(garbage_server, answer, message):
    url = garbage_server(answer)
    with pytest.raises(EpisodeError) as err:
        episode(url, timeout=0.5).reset({})
    port = url.rsplit(":", 1)[1]
    assert str(err.value) == ("environment 'openenv', episode prompt 0, sample 0, reset: raised OpenEnvError: "
                              + message.format(port=port))


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(environment="openenv"), "environment openenv needs the openenv section"),
    (dict(environment="guess_number", openenv={"url": "http://h:1", "observation_field": "prompt"}),
     "openenv set, but environment is 'guess_number', not openenv"),
    (dict(environment="openenv", openenv={"url": "h:1", "observation_field": "prompt"}), "String should match"),
    (dict(environment="openenv", openenv={"url": "http://h:1"}), "observation_field\n  Field required"),
])
def test_openenv_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**settings)


def test_openenv_without_its_settings_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^ppo.environment: openenv needs its server's settings \(ppo.openenv"):
        load_environment("openenv", "ppo.environment")

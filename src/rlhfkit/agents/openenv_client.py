"""An OpenEnv environment server as an rlhfkit environment (`ppo.environment: openenv`, docs/agents.md).

OpenEnv (openenv-core 0.3.0, `HTTPEnvServer`) serves an environment's sessions over a WebSocket at
`<url>/ws`: each connection gets its own environment instance. The client sends JSON text messages
`{"type": "reset", "data": {...}}` (the keyword arguments of the environment's reset), `{"type": "step",
"data": <Action fields>}` and `{"type": "close"}`; the server answers `{"type": "observation", "data":
{"observation": {<Observation fields>}, "reward": r | null, "done": d}}` or `{"type": "error", "data":
{"message": ..., "code": ...}}`. Its HTTP `/reset` and `/step` make a new environment per request, so an
episode of several steps needs the WebSocket.

One instance of the class `environment_class(settings)` makes is one episode and one connection, opened by
reset and closed when the server says done (or when the instance is dropped). The mapping between chat
messages and the environment's Action and Observation is a convention with two settings: the assistant
message's text is the Action's `action_field`, and the Observation's `observation_field` (a string) is a user
message, none where it is empty. The prompt record's metadata is reset's data: the server passes on the keys
its environment's reset takes (seed, episode_id, its own).

The WebSocket client (RFC 6455, text messages only) is written here on the standard library, so rlhfkit
talks to a server without openenv installed. Every failure (no connection, no answer within the timeout, an
error message, an answer outside the protocol) is an OpenEnvError saying what and naming the setting to look
at; EnvironmentEpisode reports it as an EpisodeError naming the environment and the episode.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import weakref
from urllib.parse import urlsplit

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455: the handshake's accept key
_MAX_MESSAGE = 16 << 20  # bytes; uvicorn's own limit on a WebSocket message
_TEXT, _BINARY, _CONTINUATION, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class OpenEnvError(Exception):
    """The OpenEnv server cannot be reached, or answered with an error or outside the protocol."""


def environment_class(settings) -> type:
    """The environment class (made without arguments, one instance per episode) of episodes on the server
    that `settings` (config.OpenEnvConfig: url, action_field, observation_field, timeout) names."""
    return type("OpenEnvEnvironment", (OpenEnvEnvironment,), {"settings": settings})


class OpenEnvEnvironment:
    """One episode on an OpenEnv server: reset opens a session, step sends the reply as an Action."""

    settings = None  # set by environment_class

    def reset(self, metadata: dict) -> list[dict]:
        url = self.settings.url.rstrip("/") + "/ws"
        self._ws = WebSocket(url, self.settings.timeout)
        weakref.finalize(self, self._ws.close)  # an episode that ends without done frees its session too
        messages, _, done = self._request("reset", metadata)
        if done:
            raise OpenEnvError("the server's reset answered done: true; an episode needs a model turn")
        return messages

    def step(self, assistant_message: dict) -> tuple[list[dict], float, bool]:
        messages, reward, done = self._request("step", {self.settings.action_field: assistant_message["content"]})
        if done:
            self._ws.close()
        return messages, reward, done

    def _request(self, kind: str, data: dict) -> tuple[list[dict], float, bool]:
        try:
            text = json.dumps({"type": kind, "data": data})
        except (TypeError, ValueError) as e:
            raise OpenEnvError(f"the {'prompt record' if kind == 'reset' else 'action'} cannot be sent as JSON: "
                               f"{e}") from None
        self._ws.send(text)
        try:
            answer = json.loads(self._ws.receive())
        except ValueError as e:
            raise OpenEnvError(f"the server at {self._ws.url} answered {kind} with something that is not JSON: "
                               f"{e}") from None
        if isinstance(answer, dict) and answer.get("type") == "error":
            raise OpenEnvError(self._server_error(kind, data, answer.get("data")))
        return self._observation(kind, answer)

    def _observation(self, kind: str, answer) -> tuple[list[dict], float, bool]:
        """{"type": "observation", "data": {"observation": {...}, "reward": r, "done": d}} → (messages, reward,
        done): the observation field's text a user message (none where it is empty), no reward 0."""
        data = answer.get("data") if isinstance(answer, dict) and answer.get("type") == "observation" else None
        observation = data.get("observation") if isinstance(data, dict) else None
        if not isinstance(observation, dict):
            raise OpenEnvError(f"the server at {self._ws.url} answered {kind} outside the OpenEnv protocol (not "
                               f"{{\"type\": \"observation\", \"data\": {{\"observation\": {{...}}, ...}}}}): "
                               f"{_short(answer)}")
        reward, done = data.get("reward"), data.get("done", False)
        if reward is not None and not isinstance(reward, (int, float)):  # OpenEnv's rewards may be booleans
            raise OpenEnvError(f"the server answered {kind} with a reward that is not a number: {_short(reward)}")
        if not isinstance(done, bool):
            raise OpenEnvError(f"the server answered {kind} with `done` that is not a boolean: {_short(done)}")
        field = self.settings.observation_field
        if field not in observation:
            raise OpenEnvError(f"the observation has no field {field!r} (ppo.openenv.observation_field); its "
                               f"fields: {sorted(observation)}")
        text = observation[field]
        if not isinstance(text, str):
            raise OpenEnvError(f"the observation's field {field!r} (ppo.openenv.observation_field) is not a "
                               f"string: {_short(text)}")
        return ([{"role": "user", "content": text}] if text else []), float(reward or 0.0), done

    def _server_error(self, kind: str, data: dict, error) -> str:
        error = error if isinstance(error, dict) else {}
        code, message = error.get("code", "no code"), error.get("message", _short(error))
        if code == "CAPACITY_REACHED":
            return (f"the server at {self._ws.url} refused a session: it holds at most {error.get('max_sessions')} "
                    "at once, and each episode running holds one; serve the environment with max_concurrent_envs "
                    "of at least the episodes run at once (docs/agents.md, OpenEnv)")
        if code == "VALIDATION_ERROR" and kind == "step":
            problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                                 for e in error.get("errors", ()) if isinstance(e, dict))
            return (f"the server refused the action {_short(data)} ({problems or message}); ppo.openenv.action_field "
                    "names the Action's field that carries the reply")
        return f"the server answered {kind} with an error ({code}): {message}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


class WebSocket:
    """A client connection (RFC 6455) that sends and receives text messages; every failure an OpenEnvError."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        self.url = f"{'wss' if secure else 'ws'}://{parts.netloc}{parts.path}"
        self.timeout, self._sock = timeout, None
        try:
            port = parts.port or (443 if secure else 80)
            sock = socket.create_connection((parts.hostname, port), timeout=timeout)
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            self._sock, self._file = sock, sock.makefile("rb")
            self._handshake(parts.netloc, parts.path or "/")
        except (OSError, ValueError) as e:
            self._drop()
            raise OpenEnvError(f"cannot connect to the OpenEnv server at {self.url} (ppo.openenv.url): "
                               f"{_reason(e, timeout)}") from None

    def _handshake(self, host: str, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        status = self._file.readline(1024).decode("latin-1").strip()
        headers = {}
        while (line := self._file.readline(8192)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
            if len(headers) > 100:
                break
        if status.split(" ")[1:2] != ["101"]:
            raise ValueError(f"it did not accept a WebSocket connection (is it an OpenEnv server?): it answered "
                             f"{status or 'nothing'!r}")
        expected = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise ValueError("its WebSocket handshake is wrong (Sec-WebSocket-Accept does not match the key)")

    def send(self, text: str) -> None:
        try:
            self._sock.sendall(_frame(_TEXT, text.encode()))
        except OSError as e:
            raise OpenEnvError(f"cannot send to the OpenEnv server at {self.url}: {_reason(e, self.timeout)}") from None

    def receive(self) -> str:
        """The next text message (fragments joined; pings answered)."""
        try:
            return self._receive()
        except (OSError, ValueError) as e:
            raise OpenEnvError(f"no answer from the OpenEnv server at {self.url}: {_reason(e, self.timeout)}") from None

    def _receive(self) -> str:
        parts, size = [], 0
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            size += n
            if size > _MAX_MESSAGE:
                raise ValueError(f"it sent a message of more than {_MAX_MESSAGE} bytes")
            mask = self._read(4) if b1 & 0x80 else None
            payload = _xor(self._read(n), mask) if mask else self._read(n)
            if opcode == _CLOSE:
                reason = payload[2:].decode("utf-8", "replace")
                raise ValueError(f"it closed the connection{': ' + reason if reason else ''}")
            if opcode == _PING:
                self._sock.sendall(_frame(_PONG, payload))
            elif opcode in (_TEXT, _BINARY, _CONTINUATION):
                parts.append(payload)
                if b0 & 0x80:  # FIN: the message's last fragment
                    return b"".join(parts).decode("utf-8")
            elif opcode != _PONG:
                raise ValueError(f"it sent a WebSocket frame of unknown type {opcode}")

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) < n:
            raise ValueError("it closed the connection")
        return data

    def close(self) -> None:
        """Ends the session (OpenEnv's close message, then the WebSocket's); safe to call more than once."""
        if self._sock is not None:
            try:  # OpenEnv's server ends the session on this message, then closes the WebSocket
                self._sock.sendall(_frame(_TEXT, b'{"type": "close"}'))
                self._sock.settimeout(min(self.timeout, 1.0))
                while True:  # its close frame, answered (a socket closed before it makes the server log an error)
                    self._receive()
            except ValueError:
                with contextlib.suppress(OSError):
                    self._sock.sendall(_frame(_CLOSE, struct.pack("!H", 1000)))
            except OSError:
                pass  # it is gone, or did not close in time
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
            self._sock = None


def _frame(opcode: int, payload: bytes) -> bytes:
    """One final frame, masked as a client's must be."""
    n, mask = len(payload), os.urandom(4)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + _xor(payload, mask)


def _xor(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _reason(e: Exception, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s (ppo.openenv.timeout)"
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"

"""`rlhfkit serve-reward RM_DIR`: a trained reward model over HTTP, speaking OpenRLHF's remote reward-model
protocol (remote.py is its client; docs/rewards.md):

    POST /get_reward  {"query": [text, ...], "prompts": [text, ...] (optional), "labels": [...] (ignored)}
    → 200             {"rewards": [float, ...], "scores": [float, ...]}
    GET  /health      → 200 {"status": "ok", "model": RM_DIR}

Each query is prompt + response as text, special tokens kept (OpenRLHF's client decodes them): a response
that ended ends in the EOS text. It is tokenized without adding special tokens (the prompt is already
rendered); when "prompts" gives its prompt and the query starts with it, prompt and response are tokenized
apart and joined, as rlhfkit's own re-tokenizing scorer does. A response that ended gets the EOS id back
and is scored there (the reward model was trained on replies ending in EOS); one cut at max length has no
EOS and is scored at its last token, as the in-process reward model scores it (RewardModel.score).
--max-length (default: the model's max_position_embeddings) keeps the last N tokens. Scoring runs in
batches of --batch-size under one lock (one model, many connections). A connection that sends nothing for
SOCKET_TIMEOUT_S is closed. Errors are JSON {"error": ...}: 400 for a malformed request (naming the
field), 408 for a body that stopped arriving, 413 for a body over --max-request-bytes, 500 if scoring
itself fails.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError, RlhfkitError

# Seconds a connection may stay silent (an idle keep-alive, a body that stopped arriving) before it is
# closed: otherwise each such client holds a thread and a socket forever.
SOCKET_TIMEOUT_S = 30.0


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RewardModelServer:
    """The RM and its tokenizer: score(queries, prompts) → floats, one request at a time."""

    def __init__(self, rm_dir: str, dtype: str = "auto", batch_size: int = 16, max_length: int | None = None,
                 device: str | None = None):
        from ..config import ModelConfig
        from ..engine.precision import torch_dtype
        from ..models.loading import load_tokenizer
        from ..models.reward import HEAD_FILE, RewardModel

        path = Path(rm_dir)
        if not path.is_dir():
            raise ConfigError(f"serve-reward: {rm_dir} is not a directory; give the reward model directory "
                              "`rlhfkit rm` wrote (e.g. runs/NAME/rm/final)")
        if not (path / "config.json").is_file() or not (path / HEAD_FILE).is_file():
            raise ConfigError(f"serve-reward: {rm_dir} is not a reward model directory (it needs config.json and "
                              f"{HEAD_FILE}); give the directory `rlhfkit rm` wrote (e.g. runs/NAME/rm/final)")
        if batch_size < 1:
            raise ConfigError(f"serve-reward: --batch-size must be at least 1, not {batch_size}")
        if max_length is not None and max_length < 2:
            raise ConfigError(f"serve-reward: --max-length must be at least 2, not {max_length}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
            model = RewardModel.from_pretrained(str(path), dtype=torch_dtype(dtype, "serve-reward --dtype"))
        except RlhfkitError:
            raise
        except Exception as e:  # unreadable weights or config, a tokenizer missing: the user's directory
            raise ModelLoadError(f"serve-reward: cannot load the reward model in {rm_dir}: {e}") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        if max_length is None:  # one long query would otherwise hold the lock and can run out of memory
            max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.batch_size, self.max_length = batch_size, max_length
        self.lock = threading.Lock()

    def encode(self, query: str, prompt: str | None) -> list[int]:
        """Token ids of one query, cut to the last max_length tokens; EOS-terminated only where the text
        ends in the EOS text (the response ended), as the in-process RM scores a response cut at max length
        at its last token."""
        tok = self.tokenizer
        eos, pad = tok.eos_token or "", tok.pad_token or ""
        ended = False
        while True:  # trailing padding (OpenRLHF's client may send it) and the EOS it follows
            if eos and query.endswith(eos):
                query, ended = query[:-len(eos)], True
            elif pad and query.endswith(pad):
                query = query[:-len(pad)]
            else:
                break
        if prompt and query.startswith(prompt):
            ids = (tok(prompt, add_special_tokens=False)["input_ids"]
                   + tok(query[len(prompt):], add_special_tokens=False)["input_ids"])
        else:
            ids = tok(query, add_special_tokens=False)["input_ids"]
        if ended:
            ids = ids + [self.eos]
        return ids[-self.max_length:] if self.max_length else ids

    @torch.no_grad()
    def score(self, queries: list[str], prompts: list[str] | None = None) -> list[float]:
        out: list[float] = []
        with self.lock:  # the tokenizer and the model are shared by every connection's thread
            seqs = [self.encode(q, prompts[i] if prompts else None) for i, q in enumerate(queries)]
            for i in range(0, len(seqs), self.batch_size):
                part = seqs[i:i + self.batch_size]
                lengths = torch.tensor([len(s) for s in part])
                ids = torch.full((len(part), int(lengths.max())), self.pad, dtype=torch.long)
                for row, s in enumerate(part):
                    ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
                out.extend(self.model.score(ids.to(self.device), lengths.to(self.device)).float().cpu().tolist())
        return out


def parse_request(body: bytes) -> tuple[list[str], list[str] | None]:
    """(queries, prompts or None) of a /get_reward body; RequestError(400) naming the field at fault."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object with a \"query\" list")
    if "query" not in request:
        raise RequestError(400, "field \"query\" is missing: a list of prompt + response texts")
    queries = request["query"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError(400, "field \"query\" must be a list of strings (prompt + response texts)")
    prompts = request.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "field \"prompts\", when given, must be a list of strings")
        if len(prompts) != len(queries):
            raise RequestError(400, f"field \"prompts\" has {len(prompts)} entries for {len(queries)} queries")
    labels = request.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise RequestError(400, "field \"labels\", when given, must be a list")
    return queries, prompts


def make_handler(scorer: RewardModelServer, rm_dir: str, max_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rlhfkit-serve-reward"
        timeout = SOCKET_TIMEOUT_S  # on every read and write of the connection

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON too
            self.close_connection = True
            try:
                self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})
            except OSError:
                pass

        def do_GET(self):
            if self.path.split("?")[0].rstrip("/") == "/health":
                self._send(200, {"status": "ok", "model": rm_dir})
            else:
                self._send(404, {"error": f"no such path {self.path}; use POST /get_reward or GET /health"})

        def do_POST(self):
            try:
                if self.path.split("?")[0].rstrip("/") != "/get_reward":
                    self.close_connection = True  # the body is not read
                    raise RequestError(404, f"no such path {self.path}; use POST /get_reward")
                size = self._body_size()
                try:
                    body = self.rfile.read(size)
                except TimeoutError:
                    self.close_connection = True
                    raise RequestError(408, f"the client stopped sending the body for {self.timeout:g} s") from None
                queries, prompts = parse_request(body)
                rewards = scorer.score(queries, prompts)
                self._send(200, {"rewards": rewards, "scores": rewards})
            except RequestError as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # the server stays up and says what went wrong
                print(f"serve-reward: scoring failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                self._send(500, {"error": f"scoring failed: {type(e).__name__}: {e}"})

        def _body_size(self) -> int:
            raw = self.headers.get("Content-Length")
            if raw is None:
                self.close_connection = True
                raise RequestError(411, "the request needs a Content-Length header (chunked bodies are not read)")
            try:
                size = int(raw)
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                raise RequestError(400, f"bad Content-Length {raw!r}")
            if size > max_bytes:
                self.close_connection = True
                self._discard(size)  # a client still sending would see a reset instead of the 413
                raise RequestError(413, f"the request is {size} bytes, over the limit of {max_bytes} "
                                        "(--max-request-bytes); send smaller batches")
            return size

        def _discard(self, size: int, cap: int = 64 << 20) -> None:
            left = min(size, cap)
            try:
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass

        def log_message(self, fmt, *args):  # only failures, one short line each
            pass

        def log_request(self, code="-", size="-"):
            if isinstance(code, int) and code >= 400:
                print(f"serve-reward: {self.command} {self.path} → {code}", file=sys.stderr, flush=True)

    return Handler


def serve(rm_dir: str, host: str = "127.0.0.1", port: int = 5000, batch_size: int = 16,
          max_request_bytes: int = 8 << 20, dtype: str = "auto", max_length: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then return (exit 0)."""
    if max_request_bytes < 1:
        raise ConfigError(f"serve-reward: --max-request-bytes must be positive, not {max_request_bytes}")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a server's log: no "Loading weights" bars
    disable_progress_bars()
    scorer = RewardModelServer(rm_dir, dtype, batch_size, max_length)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(scorer, rm_dir, max_request_bytes))
    except OSError as e:
        raise ConfigError(f"serve-reward: cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True

    def stop(signum, frame):  # shutdown() waits for serve_forever to return, so it runs on another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {rm_dir} on http://{host}:{server.server_address[1]} (POST /get_reward, GET /health)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    print("serve-reward: stopped", flush=True)

"""`rlhfkit serve-reward RM_DIR`: a trained reward model over HTTP, speaking the protocol of OpenRLHF's
remote reward model (remote.py is its client; docs/rewards.md):

    POST /get_reward  {"query": [text, ...], "prompts": [text, ...] (optional), "labels": [...] (ignored)}
    → 200             {"rewards": [float, ...], "scores": [float, ...]}
    GET  /health      → 200 {"status": "ok", "model": RM_DIR}

Each query is prompt + response as text; it is tokenized without adding special tokens (the prompt is
already rendered) and EOS is appended unless it ends in one, as RM training scored complete replies; the
score is read at that last token. Requests are scored in batches of --batch-size under one lock (one model,
many connections). Errors are JSON: 400 for a malformed request (naming the field), 413 for a body over
--max-request-bytes.
"""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from ..errors import ConfigError


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RewardScorer:
    """The RM and its tokenizer; score(texts) → floats, batch by batch, one batch at a time."""

    def __init__(self, rm_dir: str, dtype: str, batch_size: int, max_length: int | None):
        from ..config import ModelConfig
        from ..engine.precision import resolve_dtype, torch_dtype
        from ..models.loading import load_tokenizer
        from ..models.reward import RewardModel

        path = Path(rm_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{rm_dir} is not a model directory (no config.json); give the reward model "
                              "directory `rlhfkit rm` wrote (e.g. runs/NAME/rm/final)")
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
        self.dtype = torch_dtype(resolve_dtype(dtype))
        self.model = RewardModel.from_pretrained(str(path), dtype=self.dtype).eval().requires_grad_(False)
        self.batch_size, self.max_length = batch_size, max_length
        self.lock = threading.Lock()

    @torch.no_grad()
    def score(self, queries: list[str]) -> list[float]:
        eos = self.tokenizer.eos_token_id
        seqs = []
        for text in queries:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids if ids and ids[-1] == eos else ids + [eos]
            seqs.append(ids[-self.max_length:] if self.max_length else ids)
        out: list[float] = []
        with self.lock:
            for i in range(0, len(seqs), self.batch_size):
                part = seqs[i:i + self.batch_size]
                lengths = torch.tensor([len(s) for s in part])
                ids = torch.full((len(part), int(lengths.max())), self.tokenizer.pad_token_id)
                for row, s in enumerate(part):
                    ids[row, :len(s)] = torch.tensor(s)
                out.extend(self.model.score(ids, lengths).float().tolist())
        return out


def parse_request(body: bytes) -> list[str]:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object with a 'query' list")
    queries = request.get("query")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError(400, "field 'query' must be a list of strings (prompt + response texts)")
    prompts = request.get("prompts")
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(queries)):
        raise RequestError(400, "field 'prompts', when given, must be a list as long as 'query'")
    return queries


def make_handler(scorer: RewardScorer, rm_dir: str, max_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "model": rm_dir})
            else:
                self._send(404, {"error": f"no such path {self.path}; use POST /get_reward or GET /health"})

        def do_POST(self):
            try:
                if self.path.rstrip("/") != "/get_reward":
                    raise RequestError(404, f"no such path {self.path}; use POST /get_reward")
                size = int(self.headers.get("Content-Length") or 0)
                if size > max_bytes:
                    self.close_connection = True  # the body is not read
                    raise RequestError(413, f"the request is {size} bytes, over the limit of {max_bytes} "
                                            "(--max-request-bytes); send smaller batches")
                rewards = scorer.score(parse_request(self.rfile.read(size)))
                self._send(200, {"rewards": rewards, "scores": rewards})
            except RequestError as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # the server stays up and says what went wrong
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, fmt, *args):  # one short line per request instead of http.server's default
            print(f"serve-reward: {self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True)

    return Handler


def serve(rm_dir: str, host: str, port: int, batch_size: int, max_request_bytes: int, dtype: str,
          max_length: int | None) -> None:
    scorer = RewardScorer(rm_dir, dtype, batch_size, max_length)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(scorer, rm_dir, max_request_bytes))
    except OSError as e:
        raise ConfigError(f"serve-reward: cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True

    def stop(signum, frame):  # shutdown() waits for serve_forever, so it runs on another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {rm_dir} on http://{host}:{server.server_address[1]} (POST /get_reward, GET /health)", flush=True)
    server.serve_forever()
    server.server_close()
    print("serve-reward: stopped", flush=True)

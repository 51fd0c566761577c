"""Client of a remote reward server speaking OpenRLHF's remote reward-model protocol (docs/rewards.md):

    POST <url>  {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label or null, ...]}
    → 200       {"rewards": [float, ...], "scores": [...], "extra_logs": {...}}   ("rewards" is what is read;
                a bare JSON list of floats is accepted too)

Standard library only. Requests of at most batch_size responses; a connection error, a timeout, a 5xx,
408 (Request Timeout) or 429 (Too Many Requests) answer is tried again `retries` more times after 0.5 s,
1 s, 2 s, ... (at most 5 s), or after the answer's Retry-After (at most 60 s); any other 4xx answer is not
(the request itself is wrong). After the last try: a RewardError naming the URL, the tries and the cause.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime

from .fields import RewardError, record_field

BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 5.0
# a server's Retry-After is honoured up to this: a busy server must not stall training indefinitely
RETRY_AFTER_MAX_S = 60.0
# 4xx answers that say "try later" rather than "the request is wrong"
RETRIED_4XX = (408, 429)


def backoff(attempt: int) -> float:
    """Seconds to wait before try number `attempt` (1 = the first retry)."""
    return min(BACKOFF_START_S * 2 ** (attempt - 1), BACKOFF_MAX_S)


def retry_delay(attempt: int, retry_after: str | None) -> float:
    """Seconds before try `attempt`: the server's Retry-After (seconds or an HTTP date) when it sent a
    readable one, at most RETRY_AFTER_MAX_S; else backoff(attempt)."""
    if retry_after is None:
        return backoff(attempt)
    try:
        seconds = float(retry_after)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return backoff(attempt)
    if not math.isfinite(seconds):
        return backoff(attempt)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


class RemoteReward:
    """fn(prompts, responses, metadata) -> rewards from the server at `url`; labels are metadata[label_key]
    (None for every row when label_key is not set)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, batch_size: int = 64,
                 label_key: str | None = None):
        self.url, self.timeout, self.retries = url, float(timeout), int(retries)
        self.batch_size, self.label_key = int(batch_size), label_key

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        if self.label_key:
            labels = record_field(metadata, self.label_key, "the label sent to the reward server")
        else:
            labels = [None] * len(responses)
        out: list[float] = []
        for i in range(0, len(responses), self.batch_size):
            part = slice(i, i + self.batch_size)
            body = {"query": [p + r for p, r in zip(prompts[part], responses[part])], "prompts": prompts[part],
                    "labels": labels[part]}
            rewards = self.post(body)
            if len(rewards) != len(body["query"]):
                raise RewardError(f"reward server {self.url} returned {len(rewards)} rewards for "
                                  f"{len(body['query'])} queries")
            out.extend(rewards)
        return out

    def post(self, body: dict) -> list:
        """One request, tried 1 + retries times; the "rewards" of the answer."""
        try:
            data = json.dumps(body).encode()
        except (TypeError, ValueError) as e:  # a label that is not JSON (a datetime, bytes)
            raise RewardError(f"the request to reward server {self.url} is not JSON-serialisable: {e}") from None
        tries, cause, retry_after = self.retries + 1, "", None
        for attempt in range(tries):
            if attempt:
                time.sleep(retry_delay(attempt, retry_after))
            retry_after = None
            request = urllib.request.Request(self.url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    text = answer.read()
            except urllib.error.HTTPError as e:
                cause = f"HTTP {e.code}: {_error_text(e)}"
                if e.code < 500 and e.code not in RETRIED_4XX:
                    raise RewardError(f"reward server {self.url} refused the request ({cause})") from None
                retry_after = e.headers.get("Retry-After") if e.headers is not None else None
                continue
            except urllib.error.URLError as e:
                cause = self._describe(e.reason)
                continue
            except (OSError, http.client.HTTPException) as e:  # timeouts and resets while reading the answer
                cause = self._describe(e)
                continue
            return _rewards(text, self.url, len(body["query"]))
        raise RewardError(f"reward server {self.url} did not answer after {tries} "
                          f"{'try' if tries == 1 else 'tries'} ({cause})")

    def _describe(self, reason) -> str:
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"timed out after {self.timeout:g} s"
        if isinstance(reason, BaseException):
            return str(reason) or type(reason).__name__
        return str(reason)


def _rewards(text: bytes, url: str, n: int) -> list:
    try:
        answer = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewardError(f"reward server {url} did not answer JSON ({e}): {text[:200]!r}") from None
    rewards = answer.get("rewards") if isinstance(answer, dict) else answer
    if n == 1 and isinstance(rewards, (int, float)) and not isinstance(rewards, bool):
        rewards = [rewards]  # one query answered with a bare number
    if not isinstance(rewards, list):
        raise RewardError(f"reward server {url} answered without a \"rewards\" list: {str(answer)[:200]}")
    return rewards


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode(errors="replace")
    except Exception:
        return str(e.reason)
    try:
        parsed = json.loads(text)
        text = str(parsed.get("error", parsed.get("detail", text))) if isinstance(parsed, dict) else text
    except json.JSONDecodeError:
        pass
    return text.strip()[:300] or str(e.reason)

"""Client of a remote reward server speaking OpenRLHF's remote reward-model protocol (docs/rewards.md):

    POST <url>  {"query": [prompt + response text, ...], "prompts": [prompt text, ...], "labels": [...]}
    → 200       {"rewards": [float, ...], ...}   (a bare JSON list of floats is accepted too)

Standard library only. Batches of batch_size; a connection error, a timeout or a 5xx answer is retried
`retries` more times with bounded exponential backoff; a 4xx answer is not retried (the request is wrong).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from .sources import RewardError


class RemoteReward:
    def __init__(self, url: str, timeout: float, retries: int, batch_size: int, label_key: str | None):
        self.url, self.timeout, self.retries, self.batch_size, self.label_key = url, timeout, retries, batch_size, label_key

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        labels = [m.get(self.label_key) for m in metadata] if self.label_key else [None] * len(responses)
        out: list[float] = []
        for i in range(0, len(responses), self.batch_size):
            part = slice(i, i + self.batch_size)
            body = {"query": [p + r for p, r in zip(prompts[part], responses[part])], "prompts": prompts[part],
                    "labels": labels[part]}
            rewards = self._post(body)
            if len(rewards) != len(body["query"]):
                raise RewardError(f"the reward server {self.url} returned {len(rewards)} rewards for "
                                  f"{len(body['query'])} queries")
            out.extend(rewards)
        return out

    def _post(self, body: dict) -> list:
        data = json.dumps(body).encode()
        tries, cause = self.retries + 1, ""
        for attempt in range(tries):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return _rewards(json.loads(answer.read()), self.url)
            except urllib.error.HTTPError as e:
                cause = f"HTTP {e.code}: {_error_text(e)}"
                if e.code < 500:
                    raise RewardError(f"the reward server {self.url} refused the request ({cause})") from None
            except (socket.timeout, TimeoutError):
                cause = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as e:
                cause = str(getattr(e, "reason", e))
            except (ConnectionError, OSError) as e:
                cause = str(e)
            except json.JSONDecodeError as e:
                raise RewardError(f"the reward server {self.url} did not answer JSON: {e}") from None
        raise RewardError(f"the reward server {self.url} did not answer after {tries} "
                          f"tr{'y' if tries == 1 else 'ies'} ({cause})")


def _rewards(answer, url: str) -> list:
    rewards = answer.get("rewards") if isinstance(answer, dict) else answer
    if not isinstance(rewards, list):
        raise RewardError(f"the reward server {url} answered without a 'rewards' list: {str(answer)[:200]}")
    return rewards


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode(errors="replace")
        return json.loads(text).get("error", text)[:300]
    except Exception:
        return e.reason if isinstance(e.reason, str) else ""

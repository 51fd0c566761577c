"""What every text reward source shares: the error a failing source raises, and reading a field of the prompt
records' metadata (the reference answer of a verifier, the label sent to a remote server)."""

from __future__ import annotations

from ..errors import RlhfkitError


class RewardError(RlhfkitError):
    """A reward source failed on a batch; the message names the source and the cause."""


def record_field(metadata: list[dict], key: str, what: str) -> list:
    """metadata[i][key] for every record; RewardError naming the key and the first record without it."""
    out = []
    for i, m in enumerate(metadata):
        if not isinstance(m, dict) or key not in m:
            fields = sorted(m) if isinstance(m, dict) else []
            raise RewardError(f"prompt record {i} of the batch has no metadata field {key!r} (its fields: "
                              f"{fields}); every prompt record must carry {what} as a field {key!r} (a record's "
                              "fields other than the prompt reach the reward sources as its metadata)")
        out.append(m[key])
    return out

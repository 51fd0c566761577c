"""A columnar table of tokenized records: ragged token columns (flat + offsets), integer columns and JSON
columns (one JSON value per row, e.g. a prompt record's metadata, stored as UTF-8 bytes + offsets).

Saved as one .npz (no pickle), so a phase loads in milliseconds and later stages read exactly what
was prepared. Lengths are stored, so masks always come from lengths, never from pad ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class TokenTable:
    def __init__(self, ragged: dict[str, list[list[int]]] | None = None, scalars: dict[str, list[int]] | None = None,
                 json_columns: dict[str, list] | None = None):
        self._flat: dict[str, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._json: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name → (UTF-8 bytes, offsets)
        for name, values in (json_columns or {}).items():
            encoded = [json.dumps(v, ensure_ascii=False, default=str).encode() for v in values]  # parquet: numpy values
            offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
            self._json[name] = (np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)
        self.scalars: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.int64) for k, v in (scalars or {}).items()}
        for name, rows in (ragged or {}).items():
            lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
            self._offsets[name] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._flat[name] = (np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
                                if rows else np.zeros(0, dtype=np.int32))
        sizes = ({len(o) - 1 for o in self._offsets.values()} | {len(v) for v in self.scalars.values()}
                 | {len(o) - 1 for _, o in self._json.values()})
        if len(sizes) > 1:
            raise ValueError(f"columns have different lengths: {sizes}")

    def __len__(self) -> int:
        for o in self._offsets.values():
            return len(o) - 1
        for v in self.scalars.values():
            return len(v)
        return 0

    @property
    def ragged_columns(self) -> list[str]:
        return list(self._flat)

    def tokens(self, column: str, i: int) -> np.ndarray:
        o = self._offsets[column]
        return self._flat[column][o[i]:o[i + 1]]

    def lengths(self, column: str) -> np.ndarray:
        return np.diff(self._offsets[column])

    def row(self, i: int) -> dict:
        out = {c: self.tokens(c, i) for c in self._flat}
        out.update({c: int(v[i]) for c, v in self.scalars.items()})
        out.update({c: json.loads(data[o[i]:o[i + 1]].tobytes()) for c, (data, o) in self._json.items()})
        return out

    def save(self, path: Path) -> None:
        arrays = {}
        for c in self._flat:
            arrays[f"ragged.{c}.flat"] = self._flat[c]
            arrays[f"ragged.{c}.offsets"] = self._offsets[c]
        for c, v in self.scalars.items():
            arrays[f"scalar.{c}"] = v
        for c, (data, offsets) in self._json.items():
            arrays[f"json.{c}.bytes"] = data
            arrays[f"json.{c}.offsets"] = offsets
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> "TokenTable":
        table = cls()
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                kind, *name, part = key.split(".")
                if kind == "ragged":
                    target = table._flat if part == "flat" else table._offsets
                    target[".".join(name)] = z[key]
                elif kind == "json":
                    data, offsets = table._json.get(".".join(name), (None, None))
                    table._json[".".join(name)] = (z[key], offsets) if part == "bytes" else (data, z[key])
                else:
                    table.scalars[".".join(name + [part])] = z[key]
        return table

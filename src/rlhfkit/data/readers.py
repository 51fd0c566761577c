"""Read local files (json, jsonl, jsonl.gz, parquet) record by record, each with its location.

A record that cannot be decoded comes back as a BadRecord naming file and line, so the caller can
count and report it (or stop, under on_bad_record=error). A file that cannot be read at all is a
DataError naming the file.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .records import BadRecord

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def check_data_file(path: str | Path, label: str = "") -> Path:
    """The path as a Path, or a DataError saying what is wrong with it (missing, a directory, a file type
    we cannot read). `label` names the setting in the message, e.g. "dataset 'x': eval_path"."""
    path, label = Path(path), f"{label}: " if label else ""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.name.endswith(SUFFIXES))
        listed = ", ".join(inside[:3]) + (", …" if len(inside) > 3 else "")
        hint = f"; it holds {listed}: name one of them" if inside else ""
        raise DataError(f"{label}{path} is a directory; expected one data file ({', '.join(SUFFIXES)}){hint}")
    if not path.is_file():
        raise DataError(f"{label}data file not found: {path}")
    if not path.name.endswith(SUFFIXES):
        raise DataError(f"{label}{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return path


def iter_file_records(path: str | Path) -> Iterator[tuple[str, dict | BadRecord]]:
    """Yield (location, record or BadRecord). Raises DataError for a missing, empty or unreadable file."""
    path = check_data_file(path)
    name = path.name
    count = 0
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            records = _iter_jsonl(path)
        elif name.endswith(".parquet"):
            records = _iter_parquet(path)
        else:
            records = _iter_json_array(path)
        for item in records:
            count += 1
            yield item
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the file after {count} records: {e}") from None
    if count == 0:
        raise DataError(f"{path}: the file holds no records")


def _iter_jsonl(path: Path):
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1:
                line = line.removeprefix(BOM)  # editors on Windows start UTF-8 files with one
            if not line.strip():
                continue  # blank lines are not records
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line", where)
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRecord("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}", where)


def _iter_json_array(path: Path):
    with _open_binary(path) as f:
        raw = f.read().removeprefix(BOM)  # editors on Windows start UTF-8 files with one
    if not raw.strip():
        return
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of records (use .jsonl for one record per line)")
    for i, item in enumerate(data):
        yield f"{path}:item {i}", item


def _iter_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    for i, item in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", item

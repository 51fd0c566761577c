"""Read local files (json, jsonl, jsonl.gz, parquet, arrow, feather, csv) record by record, each with its
location. A `datasets` save_to_disk directory is recognised here and read by hf_datasets.py.

A record that cannot be decoded comes back as a BadRecord naming file and line, so the caller can
count and report it (or stop, under on_bad_record=error). A file that cannot be read at all is a
DataError naming the file.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .records import BadRecord

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow", ".feather", ".csv")
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def is_saved_dataset(path: Path) -> bool:
    """Whether a directory was written by `datasets`' save_to_disk: a Dataset or a DatasetDict of splits."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def check_data_file(path: str | Path, label: str = "") -> Path:
    """The path as a Path, or a DataError saying what is wrong with it (missing, a directory that `datasets`
    did not save, a file type we cannot read). `label` names the setting in the message, e.g.
    "dataset 'x': eval_path"."""
    path, label = Path(path), f"{label}: " if label else ""
    if is_saved_dataset(path):
        return path
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.name.endswith(SUFFIXES))
        listed = ", ".join(inside[:3]) + (", …" if len(inside) > 3 else "")
        hint = f"; it holds {listed}: name one of them" if inside else ""
        raise DataError(f"{label}{path} is a directory; expected one data file ({', '.join(SUFFIXES)}) or a "
                        f"`datasets` save_to_disk directory (with dataset_info.json and state.json, or "
                        f"dataset_dict.json){hint}")
    if not path.is_file():
        raise DataError(f"{label}data file not found: {path}")
    if not path.name.endswith(SUFFIXES):
        raise DataError(f"{label}{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return path


def iter_file_records(path: str | Path) -> Iterator[tuple[str, dict | BadRecord]]:
    """Yield (location, record or BadRecord). Raises DataError for a missing, empty or unreadable file."""
    path = check_data_file(path)
    if path.is_dir():
        raise DataError(f"{path} is a `datasets` directory; this setting takes a file ({', '.join(SUFFIXES)})")
    name = path.name
    count = 0
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            records = _iter_jsonl(path)
        elif name.endswith(".parquet"):
            records = _iter_parquet(path)
        elif name.endswith((".arrow", ".feather")):
            records = _iter_arrow(path)
        elif name.endswith(".csv"):
            records = _iter_csv(path)
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
    yield from _iter_table(path, table)


def _iter_arrow(path: Path):
    """An Arrow IPC file (.feather, .arrow) or stream (the .arrow files `datasets` writes)."""
    import pyarrow as pa
    import pyarrow.feather

    try:
        if path.name.endswith(".feather"):
            table = pyarrow.feather.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_stream(source).read_all()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read it as Arrow (IPC file or stream): {e}") from None
    yield from _iter_table(path, table)


def _iter_table(path: Path, table):
    i = 0
    for batch in table.to_batches():  # a batch at a time: a whole table as Python objects is several times its size
        for item in batch.to_pylist():
            yield f"{path}:row {i}", item
            i += 1


def _iter_csv(path: Path):
    """A header line, then one record a line (a quoted field may span lines); every field is text."""
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB refuses a long conversation in one field
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is not part of the first field name
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            line = reader.line_num + 1  # where the next record starts
            for values in reader:
                where = f"{path}:{line}"
                line = reader.line_num + 1
                if not values:
                    continue  # blank lines are not records
                if len(values) != len(header):
                    yield where, BadRecord("invalid_csv", f"the line has {len(values)} fields, the header "
                                           f"{len(header)}", where)
                else:
                    yield where, dict(zip(header, values))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 after line {reader.line_num}: {e.reason}") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None

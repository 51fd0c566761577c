"""Records from Hugging Face `datasets`: save_to_disk directories and hub dataset ids.

A hub id loads through `datasets.load_dataset`; where the hub cannot be reached, from the `datasets` cache
(where an earlier load left it) or not at all, with a message that says how to bring the data here.
A DatasetDict's train split is the train split and its test (else validation) split the eval split.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from ..errors import DataError
from ..paths import file_sha256

EVAL_SPLITS = ("test", "validation")  # a DatasetDict's eval split: the first of these it has
OFFLINE_WORDS = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the hub is off: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say so, or a quick probe cannot reach it."""
    from ..models.loading import _hub_reachable

    flagged = any(os.environ.get(v, "").upper() in OFFLINE_WORDS for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return flagged or not _hub_reachable()


@contextlib.contextmanager
def _offline_mode(datasets, offline: bool):
    """`datasets` reads HF_HUB_OFFLINE once, when imported; a hub found off later must switch its offline
    mode on too, or each load retries the hub for ~25 s before it looks in its cache."""
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


SAVE_HINT = ("or save it there with `.save_to_disk('DIR')`, copy DIR here and give it as the dataset's `path:` (its "
             "test or validation split becomes the eval split), or give data files as `path:` / `eval_path:`")


def load_hub(hub_id: str, label: str, config_name: str | None = None, split: str | None = None,
             local_hint: str = SAVE_HINT):
    """A hub dataset: a DatasetDict, or one split's Dataset. `label` names the dataset in messages; `local_hint`
    says how else to bring its data here when the hub is unreachable."""
    import datasets

    offline = hub_offline()
    try:
        with _offline_mode(datasets, offline):
            return datasets.load_dataset(hub_id, config_name, split=split)
    except ConnectionError:  # offline mode included; raised only when the `datasets` cache lacks it too
        raise DataError(
            f"{label} comes from the Hugging Face hub, which is unreachable from here, and is not in the `datasets` "
            f"cache ({datasets.config.HF_DATASETS_CACHE}). Where the hub is reachable, load it once with "
            f"`datasets.load_dataset({hub_id!r})` and copy that cache here (HF_DATASETS_CACHE names it), "
            f"{local_hint}") from None
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise DataError(f"{label}: cannot load {hub_id!r} through `datasets`{' (offline)' if offline else ''}: "
                        f"{type(e).__name__}: {e}") from None


def load_saved(path: Path, label: str):
    """A save_to_disk directory: a Dataset or a DatasetDict."""
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # as above
        raise DataError(f"{label}: cannot load the `datasets` directory {path}: {type(e).__name__}: {e}") from None


def pick_split(data, role: str, label: str, required: bool):
    """(split name, Dataset) for a role ("train" or "eval"): a DatasetDict's train split, or its test (else
    validation) split; a lone Dataset is all of it. Where it is not there, an error naming the splits there
    when the role's split is `required`, else None."""
    import datasets

    if isinstance(data, datasets.Dataset):
        return (role, data) if required else None
    names = ("train",) if role == "train" else EVAL_SPLITS
    for name in names:
        if name in data:
            return name, data[name]
    if required:
        raise DataError(f"{label} has the splits {sorted(data)}, none called {' or '.join(map(repr, names))}")
    return None


def iter_rows(ds, where_prefix: str):
    """Yield (location, row as a dict) for each row of a Dataset, a thousand rows at a time through Arrow."""
    i = 0
    for batch in ds.with_format("arrow").iter(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{where_prefix}{i}", row
            i += 1


def dir_fingerprint(path: Path) -> str:
    """SHA-256 over a directory's file names and contents: the identity of the records saved there."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()

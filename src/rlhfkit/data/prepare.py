"""Data preparation (pipeline step 1): datasets → three phases × {train, eval} → tokenized tables.

For each dataset: read and validate its records, carve an eval split when it ships none, cut train and
eval into the phases by `phase_ratios` (both cuts keep each prompt's records together, see split.py),
then render and tokenize each (split, phase) chunk. Each chunk is cached under the SHA-256 of everything
that changes its tokens, built under a lock, published by rename and checked against the checksums
written with it before reuse, so a second run (or a second process) reuses it and a damaged one is
rebuilt. The run dir gets a copy (hard link where possible) of every chunk plus manifest.json, which
later stages read. Records skipped on the way are summed up once on the console (`skip_summary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from ..config import Config, DataConfig, DatasetConfig, save_resolved_config
from ..errors import DataError
from ..paths import (cache_root, file_listing, file_sha256, link_or_copy, listing_problem, make_temp_dir, publish_dir,
                     require_dir, write_text_atomic)
from . import hf_datasets, registry
from .readers import check_data_file, iter_file_records
from .records import ALSO_ACCEPTED, REQUIRED, BadRecord, Example, detect_format, map_fields, to_example
from .render import BUILDERS, MAX_REPORTED, Renderer
from .split import carve_eval, prompt_key, split_phases
from .table import TokenTable

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when what a chunk holds changes, so old cache entries are never read (2: split by prompt,
# 3: phase-3 prompts carry their records' metadata, 4: TRL's formats read, no longer skipped)
ENTRY_FILES = ("table.npz", "stats.json")
CHECKSUMS = "checksums.json"  # written last into a cache entry: the size and SHA-256 of each entry file
PHASE_NAMES = {1: "sft", 2: "reward", 3: "ppo"}
FORMAT_PHASES = {"preference": [1, 2, 3], "sft": [1], "prompt": [3]}
SPLITS = ("train", "eval")


@dataclass
class LoadReport:
    """What happened to one dataset's raw records before splitting."""

    read: int = 0
    valid: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[dict] = field(default_factory=list)

    def skip(self, bad: BadRecord) -> None:
        self.skipped[bad.reason] += 1
        if self.skipped[bad.reason] <= MAX_REPORTED:
            self.skipped_examples.append({"reason": bad.reason, "where": bad.where, "detail": bad.detail})

    def to_dict(self) -> dict:
        return {"read": self.read, "valid": self.valid, "skipped": dict(self.skipped),
                "skipped_examples": self.skipped_examples}


class Source:
    """One dataset of the blend: where its records come from and a fingerprint of their content.

    A registry name without `path` (rows converted by registry.py), another hub id (`datasets.load_dataset`), a
    local `datasets` directory or a local file. `fields` renames the records' fields before anything reads them."""

    def __init__(self, ds: DatasetConfig):
        self.ds = ds
        self.spec = registry.REGISTRY.get(ds.name) if ds.path is None else None
        self._loaded = {}  # a hub id or directory → its Dataset / DatasetDict, loaded once
        if self.spec is not None:
            for key in ("fields", "eval_path"):
                if getattr(ds, key):
                    raise DataError(f"dataset {ds.name!r}: a registry dataset brings its own splits and fields "
                                    f"(data/registry.py); `{key}:` is for files, `datasets` directories and other hub ids")
            self.format = ds.format or self.spec.format
            return
        for label, path in (("path", ds.path), ("eval_path", ds.eval_path)):
            if path is not None:
                check_data_file(path, f"dataset {ds.name!r}: {label}")
        where, first = self._first_record()
        try:
            self.format = ds.format or detect_format(first)
        except BadRecord as e:
            raise DataError(f"dataset {ds.name!r}, {where}: {e.detail}") from None

    def _first_record(self) -> tuple[str, dict]:
        """The first record that is an object, with `fields` applied: a mapped field it lacks is an error now,
        before anything is read, as a typo in the mapping would fail every record."""
        for where, raw in self._records("train"):
            if isinstance(raw, dict):
                try:
                    return where, map_fields(raw, self.ds.fields, where)
                except BadRecord as e:
                    raise DataError(f"dataset {self.ds.name!r}, {where}: {e.detail}") from None
        raise DataError(f"dataset {self.ds.name!r}: {self.location('train')} holds no record that is an object "
                        f"(JSON object, table row)")

    @property
    def has_eval(self) -> bool:
        if self.spec is not None:
            return self.spec.eval_split is not None
        return self.ds.eval_path is not None or self._from_datasets("eval") and self._split("eval") is not None

    def identity(self) -> dict:
        if self.spec is not None:
            splits = [self.spec.train_split] + ([self.spec.eval_split] if self.spec.eval_split else [])
            content = {s: registry.hub_fingerprint(self.ds.name, s) for s in splits}
        else:
            content = {role: self._fingerprint(role) for role in SPLITS if role == "train" or self.has_eval}
        return {"name": self.ds.name, "format": self.format, "content": content, "fields": self.ds.fields,
                "phases": self.phases, "max_records": self.ds.max_records}

    def _fingerprint(self, role: str) -> str:
        path = self._path(role)
        if path is None:
            return self._split(role)[1]._fingerprint
        if Path(path).is_dir():  # a DatasetDict: one hash for the directory, whichever split the role reads
            return hf_datasets.dir_fingerprint(Path(path))
        return file_sha256(path)

    @property
    def phases(self) -> list[int]:
        return sorted(self.ds.phases or FORMAT_PHASES[self.format])

    def _path(self, role: str) -> str | None:
        """The local file or directory a role's records come from (eval_path, else path), None for the hub."""
        return self.ds.eval_path if role == "eval" and self.ds.eval_path else self.ds.path

    def _from_datasets(self, role: str) -> bool:
        path = self._path(role)
        return path is None or Path(path).is_dir()

    def _split(self, role: str):
        """(split name, Dataset) of the hub dataset or `datasets` directory a role reads; None where a role not
        named by a setting (the eval split of `path`) has no split."""
        path, label = self._path(role), f"dataset {self.ds.name!r}"
        key = path or self.ds.name
        if key not in self._loaded:
            self._loaded[key] = (hf_datasets.load_saved(Path(path), label) if path else hf_datasets.load_hub(
                key, f"{label} (no `path:` and not a known hub dataset of the registry, so a hub id)"))
        named = role == "train" or self.ds.eval_path is not None
        return hf_datasets.pick_split(self._loaded[key], role, f"{label} ({key})", required=named)

    def location(self, split: str) -> str:
        """The file (or hub dataset and split) a split's records come from, for messages."""
        if self.spec is not None:
            return f"hub dataset {self.ds.name} [{self.spec.train_split if split == 'train' else self.spec.eval_split}]"
        path = self._path(split)
        if path is None:
            return f"hub dataset {self.ds.name} [{self._split(split)[0]}]"
        return f"{path} [{self._split(split)[0]}]" if Path(path).is_dir() else path

    def _records(self, role: str):
        """(location, raw record or BadRecord) of a role, as stored: before `fields` is applied."""
        path = self._path(role)
        if not self._from_datasets(role):
            return iter_file_records(path)
        name, rows = self._split(role)
        return hf_datasets.iter_rows(rows, f"{path}[{name}]:row " if path else f"hub:{self.ds.name}[{name}]#")

    def iter_raw(self, split: str):
        if self.spec is not None:
            name = self.spec.train_split if split == "train" else self.spec.eval_split
            return registry.iter_hub_records(self.ds.name, name)
        return self._mapped(self._records(split))

    def _mapped(self, records):
        for where, raw in records:
            if not isinstance(raw, BadRecord):
                try:
                    raw = map_fields(raw, self.ds.fields, where)
                except BadRecord as bad:
                    raw = bad
            yield where, raw


FIELDS_SHOWN = 5  # records whose field names a "no valid records" error shows


def load_examples(src: Source, split: str, on_bad: str, limit: int | None) -> tuple[list[Example], LoadReport]:
    report, examples = LoadReport(), []
    found: set[str] = set()  # the fields of the first records, for the error when none is valid
    for index, (where, raw) in enumerate(src.iter_raw(split)):
        report.read += 1
        if index < FIELDS_SHOWN and isinstance(raw, dict):
            found.update(map(str, raw))
        try:
            if isinstance(raw, BadRecord):
                raise raw
            examples.append(to_example(raw, src.format, where, index))
        except BadRecord as bad:
            if on_bad == "error":
                raise DataError(f"dataset {src.ds.name!r}, {bad.where or where}: {bad.detail} "
                                f"(set data.on_bad_record=skip to count and skip such records)") from None
            report.skip(bad)
            continue
        if limit is not None and len(examples) >= limit:
            break
    report.valid = len(examples)
    if not examples:
        raise DataError(f"dataset {src.ds.name!r} ({split}): no valid records in {src.location(split)}: a "
                        f"{src.format} record needs the fields {list(REQUIRED[src.format])}"
                        f"{ALSO_ACCEPTED[src.format]}; its first records have "
                        f"{sorted(found) if found else 'no JSON object'}; skipped: {dict(report.skipped)}; other "
                        f"field names can be mapped with `fields:` (docs/data.md)")
    return examples, report


def split_dataset(src: Source, cfg: DataConfig) -> tuple[dict[tuple[str, int], list[Example]], dict]:
    """All (split, phase) chunks of one dataset, plus a report of its loading."""
    train, train_report = load_examples(src, "train", cfg.on_bad_record, src.ds.max_records)
    reports = {"train": train_report.to_dict()}
    key = src.ds.name
    if src.has_eval:
        evals, eval_report = load_examples(src, "eval", cfg.on_bad_record, cfg.max_eval_records)
        reports["eval"] = eval_report.to_dict()
    else:
        keys = [prompt_key(ex.prompt) for ex in train]
        if len(set(keys)) < 2:
            raise DataError(f"dataset {key!r}: {len(train)} valid record(s) with {len(set(keys))} distinct prompt(s), "
                            f"too few to carve out an eval split that shares no prompt with train; give an eval_path")
        tr_idx, ev_idx = carve_eval(keys, cfg.eval_fraction, cfg.seed, cfg.max_eval_records)
        train, evals = [train[i] for i in tr_idx], [train[i] for i in ev_idx]
        reports["eval"] = {"carved_from_train": len(evals)}
    phases = src.phases
    ratios = [cfg.phase_ratios[p - 1] for p in phases]
    if len(phases) > 1 and sum(ratios) == 0:
        raise DataError(f"dataset {key!r} feeds phases {phases}, but their phase_ratios are all zero")
    if len(phases) == 1:
        ratios = [1.0]  # a single-phase dataset (SFT-only, prompt-only) gives all its records to that phase
    chunks = {}
    for split, records in (("train", train), ("eval", evals)):
        keys = [prompt_key(ex.prompt) for ex in records]
        for phase, idx in zip(phases, split_phases(keys, ratios, cfg.seed)):
            chunks[(split, phase)] = [records[i] for i in idx]
    return chunks, reports


def chunk_key(identity: dict, renderer_fp: dict, cfg: DataConfig, split: str, phase: int) -> str:
    material = {
        "cache_format": CACHE_FORMAT,
        "dataset": identity,
        "split": split,
        "phase": phase,
        "phase_ratios": list(cfg.phase_ratios),
        "eval_fraction": cfg.eval_fraction,
        "max_eval_records": cfg.max_eval_records,
        "seed": cfg.seed,
        "tokenizer": renderer_fp,
        "max_seq_len": cfg.max_seq_len,
        "max_prompt_len": cfg.max_prompt_len,
        "overlong": cfg.overlong,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def data_cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return require_dir(Path(cfg.cache_dir).expanduser(), "data.cache_dir")
    return require_dir(cache_root() / "data", "the data cache (RLHFKIT_CACHE)")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def prepare_dataset(src: Source, renderer: Renderer, cfg: DataConfig, show_progress: bool) -> dict:
    """Make sure every chunk of one dataset is in the cache, intact. Returns {(split, phase): (dir, hit)}."""
    cache = data_cache_dir(cfg)
    identity = src.identity()
    fp = renderer.fingerprint()
    keys = {(s, p): chunk_key(identity, fp, cfg, s, p) for s in SPLITS for p in src.phases}
    if all(entry_problem(cache / k) is None for k in keys.values()):
        return {sp: (cache / k, True) for sp, k in keys.items()}
    lock_key = hashlib.sha256("".join(sorted(keys.values())).encode()).hexdigest()
    with FileLock(str(cache / f"{lock_key}.lock")):
        # checked again: another process may have built them while we waited for the lock
        problems = {sp: entry_problem(cache / k) for sp, k in keys.items()}
        missing = {sp: k for sp, k in keys.items() if problems[sp] is not None}
        for (split, phase), key in missing.items():
            if (cache / key).exists():
                print(f"data: cache entry {cache / key} ({src.ds.name!r}, phase {phase} {split}) is damaged: "
                      f"{problems[(split, phase)]}; rebuilding it", file=sys.stderr, flush=True)
        if missing:
            chunks, reports = split_dataset(src, cfg)
            for (split, phase), key in sorted(missing.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                _build_chunk(cache / key, chunks[(split, phase)], renderer, phase,
                             {"dataset": src.ds.name, "split": split, "phase": phase, "load": reports[split]},
                             desc=f"phase {phase} {split} {src.ds.name}", show_progress=show_progress)
    return {sp: (cache / k, sp not in missing) for sp, k in keys.items()}


def entry_problem(entry: Path) -> str | None:
    """What is wrong with a cache entry (absent, incomplete, or a file that is not what was written),
    or None when it is intact."""
    if not entry.is_dir():
        return "absent"
    try:
        written = json.loads((entry / CHECKSUMS).read_text())
    except (OSError, ValueError):
        written = None
    if not isinstance(written, dict):
        return f"{CHECKSUMS} is missing or unreadable"
    return listing_problem(entry, {name: written.get(name, {}) for name in ENTRY_FILES})


def _build_chunk(final: Path, examples: list[Example], renderer: Renderer, phase: int, header: dict,
                 desc: str, show_progress: bool) -> None:
    with tqdm(total=len(examples), desc=desc, unit="rec", disable=not show_progress, leave=False) as bar:
        table, stats = BUILDERS[phase](examples, renderer, progress=bar.update)
    tmp = make_temp_dir(final)
    try:
        table.save(tmp / "table.npz")
        (tmp / "stats.json").write_text(json.dumps({**header, **stats.to_dict(table)}, indent=1, ensure_ascii=False))
        (tmp / CHECKSUMS).write_text(json.dumps(file_listing(tmp, ENTRY_FILES), indent=1))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(cfg: Config, tokenizer=None, show_progress: bool = True) -> dict:
    """Prepare every dataset of the config; write run_dir/data/{manifest.json, phase*/...}. Returns the manifest.

    Prints the skip summary (`skip_summary`) the first time this process prepares this data."""
    from ..models.loading import load_tokenizer

    out = require_dir(cfg.output_dir, "run.output_dir") / "data"  # a file there: a message, not a traceback
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    renderer = Renderer(tokenizer, cfg.data)
    manifest = {"tokenizer": renderer.fingerprint() | {"pad_id": int(tokenizer.pad_token_id)},
                "phase_ratios": list(cfg.data.phase_ratios), "datasets": [],
                "phases": {str(p): {s: [] for s in SPLITS} for p in PHASE_NAMES}, "cache_hits": 0, "cache_misses": 0}
    manifest["tokenizer"].pop("chat_template", None)
    for ds in cfg.data.datasets:
        src = Source(ds)
        manifest["datasets"].append({"name": ds.name, "format": src.format, "phases": src.phases})
        for (split, phase), (entry, hit) in sorted(prepare_dataset(src, renderer, cfg.data, show_progress).items()):
            rel = Path(f"phase{phase}") / split / f"{_slug(ds.name)}.npz"
            link_or_copy(entry / "table.npz", out / rel)
            link_or_copy(entry / "stats.json", (out / rel).with_suffix(".stats.json"))
            stats = json.loads((entry / "stats.json").read_text())
            manifest["phases"][str(phase)][split].append(
                {"dataset": ds.name, "format": src.format, "file": str(rel), "records": stats["kept"], "cache_key": entry.name})
            manifest["cache_hits" if hit else "cache_misses"] += 1
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    save_resolved_config(cfg, out)
    _print_skip_summary_once(out)
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run `rlhfkit data prepare CONFIG` first")
    return json.loads(path.read_text())


def load_phase(data_dir: str | Path, phase: int, split: str) -> list[tuple[str, TokenTable]]:
    """The prepared tables of one phase and split, one per dataset, as later stages read them.

    A train split without a single row is an error that says why: every caller trains on it."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    tables = [(e["dataset"], _load_table(data_dir / e["file"])) for e in manifest["phases"][str(phase)][split]]
    if split == "train" and not any(len(t) for _, t in tables):
        raise DataError(why_no_training_rows(data_dir, manifest, phase))
    return tables


def _load_table(path: Path) -> TokenTable:
    try:
        return TokenTable.load(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                        f"run `rlhfkit data prepare CONFIG` again to rebuild it") from None


# ---- explaining what was skipped ----

REASON_LABELS = {"invalid_json": "invalid JSON", "invalid_utf8": "invalid UTF-8", "invalid_csv": "invalid CSV row",
                 "duplicate_prompt": "repeated phase-3 prompt"}  # PPO uses each prompt once


def why_no_training_rows(data_dir: Path, manifest: dict, phase: int) -> str:
    """Why phase `phase` has no training rows, dataset by dataset: none fed it, its share was nothing, or
    every record it got was dropped (and what reading the dataset skipped)."""
    head = f"phase {phase} ({PHASE_NAMES[phase]}) has no training rows: "
    entries = manifest["phases"][str(phase)]["train"]
    if not entries:
        fed = ", ".join(f"{d['name']!r} ({d['format']}) feeds phases {d['phases']}" for d in manifest.get("datasets", []))
        return (head + f"no dataset feeds it ({fed}). A preference dataset feeds phases 1-3, an sft one phase 1, "
                f"a prompt one phase 3, unless its `phases:` says otherwise")
    why = [f"dataset {e['dataset']!r}: {_why_empty(_chunk_stats(data_dir, e), phase, manifest)}" for e in entries]
    return head + "; ".join(why) + ". `rlhfkit data inspect CONFIG` shows more"


def _why_empty(stats: dict, phase: int, manifest: dict) -> str:
    load = stats.get("load", {})
    if stats["records_in"] == 0:
        why = (f"none of its {load.get('valid', '?')} valid training records went to phase {phase} "
               f"(phase_ratios {manifest.get('phase_ratios', '?')}, whole prompts per phase)")
    else:
        dropped = _ReasonTally()
        dropped.add(stats["dropped"], stats["dropped_examples"])
        why = f"all {stats['records_in']} records it gave phase {phase} were dropped: {dropped}"
    if load.get("skipped"):
        skipped = _ReasonTally()
        skipped.add(load["skipped"], load["skipped_examples"])
        why += f" (reading it skipped {skipped.total()} of {load['read']} records: {skipped})"
    return why


def skip_summary(data_dir: str | Path) -> str:
    """One line that sums up every record preparation skipped: unreadable or invalid when read, or
    dropped when tokenized, by reason, each with where it first happened. "" when nothing was skipped.
    It reads the prepared stats, so a cache hit reports the counts of the run that built the cache."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    read, tally, sources = 0, _ReasonTally(), set()
    for splits in manifest["phases"].values():
        for split, entries in splits.items():
            for e in entries:
                stats = _chunk_stats(data_dir, e)
                load = stats.get("load", {})
                if "read" in load and (e["dataset"], split) not in sources:  # one load report per source file
                    sources.add((e["dataset"], split))
                    read += load["read"]
                    tally.add(load["skipped"], load["skipped_examples"])
                tally.add(stats["dropped"], stats["dropped_examples"])
    return f"data: skipped {tally.total()} of {read} records: {tally}" if tally.total() else ""


_SUMMARIES_SHOWN: set[tuple[str, str]] = set()


def _print_skip_summary_once(data_dir: Path) -> None:
    """Print the skip summary on rank 0, once per process and data (every stage of a pipeline prepares)."""
    from ..engine.distributed import is_main

    text = skip_summary(data_dir)
    if text and is_main() and (str(data_dir), text) not in _SUMMARIES_SHOWN:
        _SUMMARIES_SHOWN.add((str(data_dir), text))
        print(text, flush=True)


def _chunk_stats(data_dir: Path, entry: dict) -> dict:
    return json.loads((data_dir / entry["file"]).with_suffix(".stats.json").read_text())


class _ReasonTally:
    """Counts by reason, with the earliest place each reason was seen; str() lists them, most frequent first."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, counts: dict, examples: list[dict]) -> None:
        self.counts.update(counts)
        for x in examples:
            known = self.first.get(x["reason"])
            if known is None or _position(x["where"]) < _position(known):
                self.first[x["reason"]] = x["where"]

    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            where = f" (first: {_short_where(self.first[reason])})" if reason in self.first else ""
            parts.append(f"{n} {REASON_LABELS.get(reason, reason.replace('_', ' '))}{where}")
        return ", ".join(parts)


def _position(where: str) -> tuple[str, int]:
    """("file", line) of a location such as "/d/f.jsonl:3", "/d/f.json:item 3" or "hub:name[train]#3"."""
    m = re.match(r"(.*?)[:#](?:item |row )?(\d+)$", where)
    return (m.group(1), int(m.group(2))) if m else (where, 0)


def _short_where(where: str) -> str:
    """"/long/path/f.jsonl:3" → "f.jsonl line 3", "/long/path/f.json:item 3" → "f.json:item 3"; hub locations stay."""
    if where.startswith("hub:"):
        return where
    m = re.fullmatch(r"(.*):(\d+)", Path(where).name)
    return f"{m.group(1)} line {m.group(2)}" if m else Path(where).name

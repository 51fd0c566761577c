"""`rlhfkit data inspect`: what preparation made of each dataset, per phase and split."""

from __future__ import annotations

import json
from pathlib import Path

from .prepare import PHASE_NAMES

EXAMPLE_CHARS = 400


def _clip(text: str, n: int = EXAMPLE_CHARS, keep_end: bool = False) -> str:
    text = text.replace("\n", "⏎")
    if len(text) <= n:
        return text
    return "…" + text[-n:] if keep_end else text[:n] + "…"


def _pcts(p: dict) -> str:
    return f"p50 {p['p50']:.0f} / p90 {p['p90']:.0f} / p99 {p['p99']:.0f} / max {p['max']}" if p else "-"


def format_report(data_dir: str | Path, examples: bool = True) -> str:
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    lines = [f"prepared data in {data_dir}  (cache: {manifest['cache_hits']} hit, {manifest['cache_misses']} built)"]
    loads_shown = set()
    for phase, splits in manifest["phases"].items():
        lines.append(f"\n== phase {phase} ({PHASE_NAMES[int(phase)]}) ==")
        for split, entries in splits.items():
            total = sum(e["records"] for e in entries)
            lines.append(f"  [{split}] {total} records from {len(entries)} dataset(s)")
            for e in entries:
                stats = json.loads((data_dir / e["file"]).with_suffix(".stats.json").read_text())
                lines.extend(_entry_lines(e, stats, examples and split == "train"))
                load = stats.get("load", {})
                if load.get("skipped") and (e["dataset"], split) not in loads_shown:
                    loads_shown.add((e["dataset"], split))
                    lines.append(f"      source ({split}): {load['read']} read, {load['valid']} valid, skipped {load['skipped']}")
                    lines.extend(f"        skipped {x['where']}: {x['detail']}" for x in load["skipped_examples"][:5])
    return "\n".join(lines)


def _entry_lines(entry: dict, stats: dict, with_examples: bool) -> list[str]:
    out = [f"    {entry['dataset']}: {stats['kept']} kept of {stats['records_in']}"
           f"  dropped {stats['dropped'] or 0}  truncated {stats['truncation_rate']:.1%} {stats['truncated'] or ''}"]
    for col, p in stats["token_lengths"].items():
        out.append(f"      tokens {col:<12} {_pcts(p)}")
    for x in stats["dropped_examples"][:3]:
        out.append(f"      dropped {x['where']}: {x['detail']}")
    if with_examples:
        for i, ex in enumerate(stats["examples"][:2], 1):
            out.append(f"      example {i} ({ex['id']}):")
            out.append(f"        prompt   | {_clip(ex['prompt'], keep_end=True)}")
            for field in ("response", "chosen", "rejected"):
                if field in ex:
                    out.append(f"        {field:<8} | {_clip(ex[field])}")
    return out

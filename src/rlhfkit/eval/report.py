"""The run report: one self-contained HTML file (plots embedded as PNG) with every stage's curves, the
eval table and SFT vs final responses side by side, each after its prompt's turns; where eval ran episodes,
the episodes' figures and each episode as its turns (tool calls marked, tool results and the environment's
messages set apart). Written to <run>/report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

from ..agents.calls import CALL_CLOSE, CALL_OPEN
from ..paths import write_text_atomic
from ..tracking import read_metrics
from .compare import EPISODE_FIGURES, episode_note, judge_label, judge_note, judges_of, result_rows
from .stats import fmt, fmt_interval
from .turns import Separators, prompt_turns, run_separators

CURVES = {
    "sft": ["train/loss", "eval/loss", "eval/perplexity"],
    "rm": ["train/loss", "eval/accuracy", "eval/margin"],
    "dpo": ["train/loss", "eval/rewards/accuracy", "eval/rewards/margin"],
    "ppo": ["objective/scores", "objective/kl", "objective/entropy", "rollout/response_length", "eval/score",
            "eval/kl"],
}
SAMPLES_PER_SET = 3


def _plot(stage: str, rows: list[dict], keys: list[str]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    cols = min(len(keys), 3)
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 2.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 15 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(stage, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _eval_table(results: dict) -> str:
    judges = judges_of(results)
    cols = ["set", "prompts"] + [c for j in judges for c in (f"{j} score SFT", f"{j} score final", f"{j} win rate")]
    cols += ["KL final‖SFT", "length SFT", "length final", "EOS rate SFT", "EOS rate final"]
    rows = []
    for name, s in result_rows(results).items():
        cells = [name, s["prompts"]]
        for j in judges:
            cells += [f"{s[f'{j}_sft_score']:.3f}", f"{s[f'{j}_final_score']:.3f}", f"{s[f'{j}_win_rate']:.3f}"]
        cells += [f"{s['kl_to_sft']:.3f}", f"{s['sft_length']:.1f}", f"{s['final_length']:.1f}",
                  f"{s['sft_eos_rate']:.2f}", f"{s['final_eos_rate']:.2f}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    extra = ", ".join(f"{k.replace('_', ' ')}: {results[k]:.4g}" for k in ("sft_perplexity", "final_perplexity", "rm_accuracy")
                      if results.get(k) is not None)
    if results.get("rm_accuracy_ci"):
        extra += f" {fmt_interval(results['rm_accuracy_ci'], '.3f')} on {results['rm_accuracy_pairs']} pairs"
    note = judge_note(results)
    note = f'<p id="eval-judges">{html.escape(note)}</p>' if note else ""
    return f'<table id="eval-table">{head}{"".join(rows)}</table><p>{html.escape(extra)}</p>{note}'


def _interval_table(results: dict) -> str:
    """Per set and judge: every figure with its bootstrap interval, then the set's flags (docs/evaluation.md)."""
    judges = [j for j in judges_of(results) if any(f"{j}_gain_ci" in s for s in result_rows(results).values())]
    cols = ["set", "judge", "prompts", "score SFT", "score final", "gain final − SFT", "win rate",
            "gain at equal length", "score per extra token", "KL final‖SFT", "length final − SFT"]
    rows, flags = [], []
    for name, s in result_rows(results).items():
        if "bootstrap" not in s:  # written before intervals existed
            continue
        for j in judges:
            cells = [name, judge_label(results, j), s["prompts"],
                     f"{fmt(s[f'{j}_sft_score'], '.3f')} {fmt_interval(s[f'{j}_sft_score_ci'], '.3f')}",
                     f"{fmt(s[f'{j}_final_score'], '.3f')} {fmt_interval(s[f'{j}_final_score_ci'], '.3f')}",
                     f"{fmt(s[f'{j}_gain'])} {fmt_interval(s[f'{j}_gain_ci'])}",
                     f"{fmt(s[f'{j}_win_rate'], '.2f')} {fmt_interval(s[f'{j}_win_rate_ci'], '.2f')}",
                     f"{fmt(s[f'{j}_gain_at_equal_length'])} {fmt_interval(s[f'{j}_gain_at_equal_length_ci'])}",
                     fmt(s[f"{j}_score_per_token"], "+.4f"),
                     f"{fmt(s['kl_to_sft'], '.3f')} {fmt_interval(s['kl_to_sft_ci'], '.3f')}",
                     f"{fmt(s['length_diff'], '+.1f')} {fmt_interval(s['length_diff_ci'], '+.1f')}"]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        level = s["bootstrap"]["confidence"]
        flags += [f"<li><b>{html.escape(name)}: {html.escape(f['flag'])}</b> {html.escape(f['reason'])}</li>"
                  for f in s["flags"]]
    if not rows:
        return ""
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    note = (f"<p>Brackets: {level:.0%} percentile-bootstrap intervals over prompts (docs/evaluation.md). A gain "
            "whose interval includes 0 is not distinguishable from no gain on these prompts.</p>")
    flag_list = f'<ul id="eval-flags">{"".join(flags)}</ul>' if flags else "<p>No flags.</p>"
    return f'<table id="eval-intervals">{head}{"".join(rows)}</table>{note}{flag_list}'


def _episode_table(results: dict) -> str:
    """Per set: the tool-call rate, valid-call rate and turns per episode of each model and their difference,
    with their intervals."""
    if not results.get("episodes"):
        return ""
    cols = ["set", "figure", "SFT", "final", "final − SFT"]
    rows = []
    for name, s in result_rows(results).items():
        for fig, label in EPISODE_FIGURES.items():
            cells = [name, label, f"{fmt(s[f'sft_{fig}'], '.2f')} {fmt_interval(s[f'sft_{fig}_ci'], '.2f')}",
                     f"{fmt(s[f'final_{fig}'], '.2f')} {fmt_interval(s[f'final_{fig}_ci'], '.2f')}",
                     f"{fmt(s[f'{fig}_diff'])} {fmt_interval(s[f'{fig}_diff_ci'])}"]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    note = (f"<p>{html.escape(episode_note(results['episodes']))}. Tool-call rate: share of episodes with a tool "
            "call; valid-call rate: calls that returned a result / calls (n/a without a call).</p>")
    return f'<h3>Episodes</h3><table id="eval-episodes">{head}{"".join(rows)}</table>{note}'


_CALL = re.compile(re.escape(CALL_OPEN) + ".*?(?:" + re.escape(CALL_CLOSE) + "|$)", re.DOTALL)
_ROLE_LABELS = {"model": "model", "tool": "tool result", "environment": "environment"}


def _episode(episode: dict) -> str:
    """An episode as its turns: the model's (each tool call marked), then what a tool or the environment added."""
    blocks = []
    for m in episode["messages"]:
        text = m["text"]
        if m["role"] == "model":  # escaped piece by piece, so that only the calls are marked
            pieces, at = [], 0
            for call in _CALL.finditer(text):
                pieces += [html.escape(text[at:call.start()]), f'<mark class="call">{html.escape(call.group(0))}</mark>']
                at = call.end()
            body = "".join(pieces) + html.escape(text[at:])
        else:
            body = html.escape(text)
        blocks.append(f'<div class="turn {m["role"]}"><span class="role">{_ROLE_LABELS[m["role"]]}</span>'
                      f'<pre>{body}</pre></div>')
    return "".join(blocks)


def _episode_counts(episode: dict) -> str:
    errors = "".join(f", {n} {kind}" for kind, n in sorted(episode["errors"].items()))
    return (f"{episode['turns']} turns, {episode['calls']} calls, {episode['valid_calls']} valid{errors}; "
            f"ended: {episode['end']}")


def _samples(generations: Path, seps: Separators | None) -> str:
    if not generations.is_file():
        return ""
    shown: dict[str, int] = {}
    blocks = []
    for line in generations.read_text(encoding="utf-8").splitlines():
        g = json.loads(line)
        if shown.get(g["set"], 0) >= SAMPLES_PER_SET:
            continue
        shown[g["set"]] = shown.get(g["set"], 0) + 1
        sides = []
        for side, label in (("sft", "SFT"), ("final", "final")):
            episode = g.get(f"{side}_episode")
            if episode is None:
                sides.append(f'<div><h4>{label} ({_scores(g, side)})</h4><pre>{html.escape(g[side])}</pre></div>')
            else:
                sides.append(f'<div class="episode"><h4>{label} ({_scores(g, side)}; '
                             f'{html.escape(_episode_counts(episode))})</h4>{_episode(episode)}</div>')
        blocks.append(
            f'<div class="sample"><div class="prompt"><b>{html.escape(g["set"])} #{g["index"]}</b>'
            f'{_prompt(g["prompt"], seps)}</div><div class="pair">{"".join(sides)}</div></div>')
    return "".join(blocks)


def _prompt(text: str, seps: Separators | None) -> str:
    """The prompt as its turns, each with its role; as the model saw it where its turns cannot be told apart."""
    turns = prompt_turns(text, seps) if seps else None
    if turns is None:
        return f'<pre class="raw-prompt">{html.escape(text)}</pre>'
    return "".join(f'<div class="turn {html.escape(t["role"])}"><span class="role">{html.escape(t["role"])}'
                   f'{" (cut to data.max_prompt_len)" if t["cut"] else ""}</span>'
                   f'<pre>{"…" if t["cut"] else ""}{html.escape(t["content"])}</pre></div>' for t in turns)


def _scores(g: dict, side: str) -> str:
    """"rm 0.42, accuracy 1.00": every judge's score of one generation."""
    return html.escape(", ".join(f"{k[:-len(side) - 1]} {v:.2f}" for k, v in g.items()
                                 if k.endswith(f"_{side}") and isinstance(v, float) and not k.startswith(("kl", "length"))))


STYLE = """body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}
th{background:#eef}td:first-child{text-align:left}img{max-width:100%;margin:6px 0}
.pair{display:flex;gap:12px}.pair>div{flex:1;background:#f6f6f6;padding:6px}
pre{white-space:pre-wrap;font-size:12px;margin:4px 0}.sample{border-top:1px solid #ddd;margin:10px 0;padding-top:6px}
.turn{margin:4px 0;padding:2px 8px;border-left:3px solid #99c}.turn.assistant{border-left-color:#9c9}
.turn.system{border-left-color:#bbb}.role{font-size:11px;color:#666;text-transform:uppercase}
.turn.model{border-left-color:#9c9}.turn.tool{border-left-color:#c96;background:#fff6ee}
.turn.environment{border-left-color:#96c;background:#f6f0ff}mark.call{background:#fde68a}"""


def build_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    parts = [f"<h1>rlhfkit run report: {html.escape(run_dir.name)}</h1>", "<h2>Training curves</h2>"]
    for stage, keys in CURVES.items():
        rows = read_metrics(run_dir / stage / "metrics.jsonl")
        png = _plot(stage, rows, keys) if rows else None
        if png:
            parts.append(f'<img alt="{stage} curves" src="data:image/png;base64,{png}">')
    results_file = run_dir / "eval" / "eval.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        parts += ["<h2>Evaluation: final vs SFT</h2>", _eval_table(results), _interval_table(results),
                  _episode_table(results), "<h2>Sample responses</h2>", _samples(run_dir / "eval" / "generations.jsonl", run_separators(run_dir))]
    else:
        parts.append("<p>No evaluation yet (run <code>rlhfkit eval</code>).</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rlhfkit report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = run_dir / "report.html"
    write_text_atomic(out, page)
    return out

"""Render chat turns through the tokenizer's chat template and tokenize each phase.

Layout of every tokenized sequence:  prompt tokens | response tokens | EOS
  - the prompt is the template rendered with the generation prompt (what the model sees at rollout);
  - the response is tokenized on its own, as the model would generate it, then one EOS *id* is
    appended (never a string that could tokenize into several tokens);
  - `prompt_len` marks the boundary, lengths are stored, masks later come from those.
Over-long records follow `data.overlong`: "truncate" cuts the prompt from the left (keeping the latest
turns) to max_prompt_len, then the response from the right to fit max_seq_len (a cut response has no
EOS: it did not end); "drop" drops them. Either way they are counted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from jinja2 import TemplateError

from ..config import DataConfig
from ..errors import DataError
from .records import Example
from .table import TokenTable

MAX_REPORTED = 20  # dropped-record examples kept per reason in the stats


@dataclass
class PhaseStats:
    records_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_examples: list[dict] = field(default_factory=list)
    truncated: Counter = field(default_factory=Counter)  # what was cut: prompt / response counts
    truncated_rows: int = 0
    examples: list[dict] = field(default_factory=list)

    def keep(self, cut: Counter) -> None:
        self.kept += 1
        self.truncated.update(cut)
        self.truncated_rows += bool(cut)

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] <= MAX_REPORTED:
            self.dropped_examples.append({"reason": reason, "where": where, "detail": detail})

    def to_dict(self, table: TokenTable) -> dict:
        lengths = {}
        for col in table.ragged_columns:
            ls = table.lengths(col)
            lengths[col] = _percentiles(ls)
        if "prompt_len" in table.scalars:
            lengths["prompt"] = _percentiles(table.scalars["prompt_len"])
        return {
            "records_in": self.records_in,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "dropped_examples": self.dropped_examples,
            "truncated": dict(self.truncated),
            "truncation_rate": self.truncated_rows / self.kept if self.kept else 0.0,
            "token_lengths": lengths,
            "examples": self.examples,
        }


def _percentiles(values) -> dict:
    if len(values) == 0:
        return {}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "max": int(np.max(values)), "mean": float(np.mean(values))}


class Renderer:
    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.use_template = cfg.template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        eos = cfg.eos_token or tokenizer.eos_token
        if eos is None:
            raise DataError("the tokenizer has no EOS token; set data.eos_token")
        ids = tokenizer.convert_tokens_to_ids([eos])
        if ids[0] is None or ids[0] == tokenizer.unk_token_id and eos != tokenizer.unk_token:
            raise DataError(f"data.eos_token {eos!r} is not a single token of this tokenizer")
        self.eos_id = int(ids[0])
        self.specials = sorted({s for s in tokenizer.all_special_tokens if s}, key=len, reverse=True)

    def fingerprint(self) -> dict:
        """Everything about the tokenizer and rendering that changes tokens (part of the cache key)."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(self.tok.get_vocab(), sort_keys=True)
        return {
            "tokenizer_class": type(self.tok).__name__,
            "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
            "special_tokens": {k: str(v) for k, v in sorted(self.tok.special_tokens_map.items())},
            "chat_template": self.tok.chat_template if self.use_template else None,
            "template": "chat_template" if self.use_template else "plain",
            "eos_id": self.eos_id,
            "system_prompt": self.cfg.system_prompt,
        }

    def prompt_text(self, turns: list[dict]) -> str:
        if self.cfg.system_prompt and turns and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.cfg.system_prompt}] + turns
        if self.use_template:
            try:
                return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:  # e.g. a template that takes no `tool` messages
                roles = sorted({t["role"] for t in turns})
                raise DataError(f"the chat template of {self.tok.name_or_path!r} refuses a conversation with the roles "
                                f"{', '.join(roles)}: {type(e).__name__}: {e}") from None
        # Plain format for tokenizers without a chat template (base models): hh-rlhf style.
        names = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
        return "".join(f"\n\n{names.get(t['role'], t['role'])}: {t['content']}" for t in turns).lstrip("\n") + "\n\nAssistant:"

    def _special_in_prompt(self, turns: list[dict]) -> str | None:
        # The rendered prompt is tokenized with special tokens parsed (the template's own markers must be),
        # so a special-token string inside user text would turn into a control token. Such records are dropped.
        for t in turns:
            for s in self.specials:
                if s in t["content"]:
                    return s
        return None

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=not self.use_template)["input_ids"] if texts else []

    def encode_responses(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if not self.use_template:
            texts = [" " + t for t in texts]
        # split_special_tokens: text that looks like "<|im_end|>" in a reply stays text, never a control token.
        return self.tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)


def _fit(prompt: list[int], responses: list[list[int]], r: Renderer):
    """Apply max_prompt_len / max_seq_len to one record. Returns (prompt, responses + EOS, what was cut),
    or None when the policy is "drop" and the record does not fit."""
    cfg, cut = r.cfg, Counter()
    if len(prompt) > cfg.max_prompt_len:
        if cfg.overlong == "drop":
            return None
        prompt, cut["prompt"] = prompt[-cfg.max_prompt_len:], 1
    room = cfg.max_seq_len - len(prompt)
    fitted = []
    for resp in responses:
        if len(resp) + 1 <= room:
            fitted.append(resp + [r.eos_id])
        elif cfg.overlong == "drop":
            return None
        else:
            fitted.append(resp[:room])
            cut["response"] += 1
    return prompt, fitted, cut


def _advance(progress, n: int) -> None:
    if progress and n:
        progress(n)


def _prepare_prompts(examples: list[Example], r: Renderer, stats: PhaseStats):
    """Drop records with special tokens in their text; render and tokenize the rest's prompts."""
    usable = []
    for ex in examples:
        bad = r._special_in_prompt(ex.prompt)
        if bad:
            stats.drop("special_token_in_text", ex.where, f"the prompt contains the special token {bad!r}")
        else:
            usable.append(ex)
    return usable, r.encode_prompts([r.prompt_text(ex.prompt) for ex in usable])


def build_sft(examples: list[Example], r: Renderer, progress=None) -> tuple[TokenTable, PhaseStats]:
    """Phase 1: prompt + response (+EOS). Loss is later taken on tokens [prompt_len, length)."""
    stats = PhaseStats(records_in=len(examples))
    usable, prompts = _prepare_prompts(examples, r, stats)
    responses = r.encode_responses([ex.chosen for ex in usable])
    ids_col, prompt_len = [], []
    _advance(progress, len(examples) - len(usable))
    for ex, p, resp in zip(usable, prompts, responses):
        _advance(progress, 1)
        fit = _fit(p, [resp], r)
        if fit is None:
            stats.drop("too_long", ex.where, f"prompt {len(p)} + response {len(resp)} tokens exceed the limits")
            continue
        p, (full,), cut = fit
        stats.keep(cut)
        ids_col.append(p + full)
        prompt_len.append(len(p))
        if len(stats.examples) < 2:
            stats.examples.append({"id": ex.id, "prompt": r.decode(p), "response": r.decode(full)})
    return TokenTable({"input_ids": ids_col}, {"prompt_len": prompt_len}), stats


def build_pairs(examples: list[Example], r: Renderer, progress=None) -> tuple[TokenTable, PhaseStats]:
    """Phase 2: the same prompt with the chosen and the rejected response; one prompt_len for both."""
    stats = PhaseStats(records_in=len(examples))
    distinct = []
    for ex in examples:
        if ex.chosen == ex.rejected:
            stats.drop("chosen_equals_rejected", ex.where, "chosen and rejected are the same text")
        else:
            distinct.append(ex)
    usable, prompts = _prepare_prompts(distinct, r, stats)
    chosen = r.encode_responses([ex.chosen for ex in usable])
    rejected = r.encode_responses([ex.rejected for ex in usable])
    cols = {"chosen_ids": [], "rejected_ids": []}
    prompt_len = []
    _advance(progress, len(examples) - len(usable))
    for ex, p, c, rj in zip(usable, prompts, chosen, rejected):
        _advance(progress, 1)
        fit = _fit(p, [c, rj], r)
        if fit is None:
            stats.drop("too_long", ex.where, f"prompt {len(p)} + responses {len(c)}/{len(rj)} tokens exceed the limits")
            continue
        p, (fc, fr), cut = fit
        if fc == fr:  # identical after truncation: the pair says nothing
            stats.drop("chosen_equals_rejected", ex.where, "chosen and rejected are identical after truncation")
            continue
        stats.keep(cut)
        cols["chosen_ids"].append(p + fc)
        cols["rejected_ids"].append(p + fr)
        prompt_len.append(len(p))
        if len(stats.examples) < 2:
            stats.examples.append({"id": ex.id, "prompt": r.decode(p), "chosen": r.decode(fc), "rejected": r.decode(fr)})
    return TokenTable(cols, {"prompt_len": prompt_len}), stats


def build_prompts(examples: list[Example], r: Renderer, progress=None) -> tuple[TokenTable, PhaseStats]:
    """Phase 3: prompts for rollouts (left-truncated to max_prompt_len), each distinct prompt once."""
    stats = PhaseStats(records_in=len(examples))
    usable, prompts = _prepare_prompts(examples, r, stats)
    seen, ids_col, metadata = set(), [], []
    _advance(progress, len(examples) - len(usable))
    for ex, p in zip(usable, prompts):
        _advance(progress, 1)
        key = tuple(p)
        if key in seen:
            stats.drop("duplicate_prompt", ex.where, "the same prompt appears earlier in this phase")
            continue
        seen.add(key)
        fit = _fit(p, [], r)
        if fit is None:
            stats.drop("too_long", ex.where, f"prompt of {len(p)} tokens exceeds max_prompt_len")
            continue
        fitted, _, cut = fit
        stats.keep(cut)
        ids_col.append(fitted)
        metadata.append(ex.metadata)
        if len(stats.examples) < 2:
            stats.examples.append({"id": ex.id, "prompt": r.decode(fitted)})
    return TokenTable({"prompt_ids": ids_col}, json_columns={"metadata": metadata}), stats


BUILDERS = {1: build_sft, 2: build_pairs, 3: build_prompts}

"""GSM8K's calculator annotations as tool-use transcripts: the SFT cold start of configs/gsm8k-tools.yaml.

    .venv/bin/python scripts/gsm8k_tool_transcripts.py --out runs/gsm8k-tools-sft.jsonl.gz [--max-calls 2] [--records N]

Why: SmolLM2-135M-Instruct as shipped never writes a tool call (0 of 48 sampled episodes), so GRPO with the
calculator gets no signal for tool use. A short SFT on transcripts in the episode's own format fixes that.

What: GSM8K's solutions mark each computation as `48/2 = <<48/2=24>>24`. Each annotation becomes a calculator call
that ends the assistant's turn; the tool's reply follows; the next assistant turn goes on from the result (the
solution's text after the annotation); the last turn ends with GSM8K's `#### <answer>` line:

    system     the recipe's data.system_prompt with the tool instructions, as the episode prompt has it
    user       Natalia sold clips to 48 of her friends in April, ...
    assistant  Natalia sold 48/2 =
               <tool_call>
               {"name": "calculator", "arguments": {"expression": "48/2"}}
               </tool_call>
    tool       24
    assistant  24 clips in May.
               Natalia sold 48+24 =
               <tool_call>
               ...
    tool       72
    assistant  72 clips altogether in April and May.
               #### 72

A word glued to the annotation (`$<<12/60=0.2>>0.2`) moves to the next turn (`$0.2 per minute.`).

The same code as the episodes, never a copy of its text: the system message is calls.with_tool_instructions over
the config's data.system_prompt and ppo.tools' schemas (what agents.episode.EpisodeTemplate puts in the episode
prompt for a chat template without `tools=`, SmolLM2's); each call is read by calls.parse_tool_calls and run by
runner.run_calls with the real calculator, and its Observation.message is the tool message. So the SFT text is
what RL shows the model (tests/test_tool_transcripts.py checks the token ids too).

Kept: questions with 1 to --max-calls calls (default ppo.max_turns - 1, so a transcript's calls and its answer
fit the episode's turns) whose calculator results all equal the annotation's result, and whose last turn holds
the `####` line. Dropped questions are counted by reason.

Which questions: the SFT questions must not be ones RL trains or evaluates on. The data stage reads the first
`max_records` valid records of a dataset in file order (data/prepare.load_examples) and carves phase 3's eval
prompts out of those; so every question a phase-3 dataset of the config reads (its first max_records valid
records, 2000 in the recipe, train and carved eval alike) is left out here, compared as the data stage groups
prompts (data/split.prompt_key). From gsm8k_train that leaves the records after the first 2000. The pipeline's
eval stage uses gsm8k_test, which shares no question with gsm8k_train.

One SFT record per assistant turn: rlhfkit's SFT trains on the last assistant turn of a `messages` record and
treats the turns before it as the prompt, masked from the loss (data/records.py). One record holding the whole
conversation would train the final answer only; one record per turn, `messages` being the conversation up to
and ending with that turn, trains every turn (the calls and the answer) in the context the episode gives it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

from rlhfkit.agents.calls import CALL_CLOSE, CALL_OPEN, ToolCall, parse_tool_calls, template_takes_tools, \
    with_tool_instructions
from rlhfkit.agents.runner import run_calls
from rlhfkit.agents.tools import load_tools
from rlhfkit.config import Config, load_config
from rlhfkit.data.prepare import FORMAT_PHASES, Source, load_examples
from rlhfkit.data.readers import iter_file_records
from rlhfkit.data.records import BadRecord, prompt_turns
from rlhfkit.data.split import prompt_key
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import load_tokenizer

TOOL = "calculator"
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]*)>>")
GLUED = re.compile(r"\S*$")  # the word an annotation is glued to, at the end of the text before it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the transcripts, a .jsonl.gz (or .jsonl) of {id, messages} records")
    p.add_argument("--config", default="configs/gsm8k-tools.yaml",
                   help="the recipe whose system prompt, tools, tokenizer, turns and phase-3 questions apply")
    p.add_argument("--source", help="GSM8K records {id, prompt, response, final_answer}; default: the file of the "
                   "config's first phase-3 dataset")
    p.add_argument("--max-calls", type=int, help="most calls per question; default: ppo.max_turns - 1")
    p.add_argument("--records", type=int, help="stop after this many questions are kept (each gives 1 + its calls "
                   "SFT records); default: all")
    return p.parse_args(argv)


def phase3_datasets(cfg: Config) -> list:
    """The config's datasets that feed RL prompts (phase 3); a dataset's file is opened only where its phases
    depend on its records' format (neither `phases:` nor `format:` set), as the data stage decides them."""
    out = []
    for ds in cfg.data.datasets:
        phases = ds.phases or (FORMAT_PHASES[ds.format] if ds.format else Source(ds).phases)
        if 3 in phases:
            out.append(ds)
    return out


def rl_questions(cfg: Config) -> set[str]:
    """The prompt keys of every record the config's phase-3 datasets read: their first max_records valid
    records, from which the data stage also carves the RL eval prompts (and their eval files, if any)."""
    keys = set()
    for ds in phase3_datasets(cfg):
        src = Source(ds)
        for split, limit in [("train", ds.max_records)] + ([("eval", cfg.data.max_eval_records)] if src.has_eval else []):
            examples, _ = load_examples(src, split, "skip", limit)
            keys.update(prompt_key(ex.prompt) for ex in examples)
    return keys


def call_text(expression: str) -> str:
    """A calculator call in the format the tool instructions show the model."""
    body = json.dumps({"name": TOOL, "arguments": {"expression": expression}}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def split_solution(solution: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The assistant turns' texts without their calls, and each annotation's (expression, result): turn k ends
    where annotation k stands (its call follows), the last turn is the rest of the solution."""
    texts, annotations, carry, at = [], [], "", 0
    for m in ANNOTATION.finditer(solution):
        before = carry + solution[at:m.start()]
        glued = GLUED.search(before)
        texts.append(before[:glued.start()].strip())
        carry, at = glued.group(0), m.end()
        annotations.append((m.group(1).strip(), m.group(2).strip()))
    texts.append((carry + solution[at:]).strip())
    return texts, annotations


def same_number(tool_result: str, annotated: str) -> bool:
    try:
        return math.isclose(float(tool_result), float(annotated.replace(",", "").lstrip("$")), rel_tol=1e-9,
                            abs_tol=1e-12)
    except ValueError:
        return False


def transcript(question: list[dict], solution: str, system: list[dict], tools: dict, timeout: float,
               max_calls: int) -> tuple[list[dict] | None, str]:
    """The conversation of one GSM8K question (its turns as the data stage reads them) and solution: the system
    message, the question, assistant turns and tool messages; or None and why it was dropped."""
    texts, annotations = split_solution(solution)
    if "<<" in ANNOTATION.sub("", solution):
        return None, "unreadable_annotation"
    if not annotations:
        return None, "no_calls"
    if len(annotations) > max_calls:
        return None, "too_many_calls"
    if "####" not in texts[-1]:
        return None, "no_answer_line"
    messages = system + question
    for text, (expression, annotated) in zip(texts, annotations):
        turn = f"{text}\n{call_text(expression)}" if text else call_text(expression)
        calls = parse_tool_calls(turn)  # read as an episode reads the model's turn
        if calls != [ToolCall(TOOL, {"expression": expression})]:
            return None, "call_not_read_back"
        (observation,) = run_calls(calls, tools, timeout)
        if observation.error is not None:
            return None, f"calculator_{observation.error}"
        if not same_number(observation.content, annotated):
            return None, "result_differs"
        messages += [{"role": "assistant", "content": turn}, observation.message]
    return messages + [{"role": "assistant", "content": texts[-1]}], "kept"


def system_messages(cfg: Config, tools: dict) -> list[dict]:
    """The episode prompt's system message as a one-message list: data.system_prompt with the tools' instructions,
    as EpisodeTemplate adds them for a template without `tools=`. A template that takes `tools=` describes the tools
    itself, which the SFT data path (rendering `messages` without `tools=`) cannot reproduce: an error."""
    tokenizer = load_tokenizer(cfg.model)
    if template_takes_tools(tokenizer):
        raise RlhfkitError(f"the chat template of {cfg.model.name_or_path!r} takes `tools=`: its episodes describe "
                           "the tools through the template, which SFT on `messages` records does not render")
    conversation = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    return with_tool_instructions(conversation, [t.schema for t in tools.values()])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        if cfg.ppo.tools != [TOOL]:
            raise RlhfkitError(f"{args.config}: ppo.tools is {cfg.ppo.tools}; these transcripts call {TOOL!r} alone")
        max_calls = cfg.ppo.max_turns - 1 if args.max_calls is None else args.max_calls
        if not 1 <= max_calls < cfg.ppo.max_turns:
            raise RlhfkitError(f"--max-calls {max_calls}: must be 1 to ppo.max_turns - 1 = {cfg.ppo.max_turns - 1} "
                               "(an episode's calls and its answer are one turn each)")
        datasets = phase3_datasets(cfg)
        if args.source is None and not datasets:
            raise RlhfkitError(f"{args.config}: no dataset feeds phase 3; name the GSM8K file with --source")
        source = args.source or datasets[0].path
        tools = load_tools(cfg.ppo.tools, "ppo.tools")
        system = system_messages(cfg, tools)
        excluded = rl_questions(cfg)
        counts, questions, out = Counter(), 0, []
        for where, raw in iter_file_records(source):
            try:
                if isinstance(raw, BadRecord) or not isinstance(raw.get("response"), str):
                    raise BadRecord("bad_record", "not a GSM8K record {prompt, response}")
                question = prompt_turns(raw.get("prompt"), where)
            except BadRecord:
                counts["bad_record"] += 1
                continue
            if prompt_key(question) in excluded:
                counts["rl_question"] += 1
                continue
            messages, why = transcript(question, raw["response"], system, tools, cfg.ppo.tool_timeout_s, max_calls)
            counts[why] += 1
            if messages is None:
                continue
            ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            out += [{"id": f"{raw.get('id', where)}-turn{k}", "messages": messages[:end + 1]}
                    for k, end in enumerate(ends, 1)]
            questions += 1
            if args.records is not None and questions >= args.records:
                break
    except RlhfkitError as e:
        print(f"gsm8k_tool_transcripts: {e}", file=sys.stderr)
        return 1
    write_records(Path(args.out), out)
    print(f"{source}: {questions} questions kept → {len(out)} SFT records in {args.out}; "
          f"counts: {dict(sorted(counts.items()))}")
    return 0


def write_records(path: Path, records: list[dict]) -> None:
    """JSONL (gzipped for a .gz name), written to a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with (gzip.open if path.name.endswith(".gz") else open)(tmp, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

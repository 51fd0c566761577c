"""README's code blocks are what a newcomer copies: every file, flag and config key they name must exist,
the commands in RUNS (those that finish on a CPU in seconds) must run, and the docs they point to must be
there. Also: the two commands .ci/run calls stay in README verbatim, the layout matches src/rlhfkit/, and
every docs page is reachable from README or the docs index."""

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHARED

README = REPO / "README.md"
DOCS = REPO / "docs"
RLHFKIT = REPO / ".venv" / "bin" / "rlhfkit"
MAX_README_LINES = 180
# Top-level folders whose paths a README command may name; they must exist in the repository.
REPO_DIRS = ("configs", "docs", "scripts", "src", "tests", "benchmarks")
# README commands that run here in seconds, each exactly as README writes it (outputs go to a temp dir).
RUNS = [
    "rlhfkit data inspect configs/tiny.yaml",
    "rlhfkit config show configs/quickstart.yaml --changed",
    "rlhfkit config check configs/gpu/ppo-hh-qwen2.5-1.5b.yaml --world-size 8",
]
# Commands that need ../shared's data files
NEEDS_SHARED = {"rlhfkit data inspect configs/tiny.yaml"}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(body: str) -> list[list[str]]:
    """The commands of a bash block as argv lists: continuation lines joined, comments dropped, `&&` split."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


def readme_blocks(lang: str) -> list[str]:
    return [body for block_lang, body in fenced_blocks(README.read_text(encoding="utf-8")) if block_lang == lang]


def readme_commands() -> list[list[str]]:
    return [cmd for body in readme_blocks("bash") for cmd in shell_commands(body)]


def rlhfkit_argv(cmd: list[str]) -> list[str] | None:
    """The rlhfkit arguments of a command: `rlhfkit ...`, `.venv/bin/rlhfkit ...`, or a launcher's
    `-m rlhfkit.cli ...` / `--module rlhfkit.cli ...`; None for other commands."""
    if cmd and Path(cmd[0]).name == "rlhfkit":
        return cmd[1:]
    if "rlhfkit.cli" in cmd:
        return cmd[cmd.index("rlhfkit.cli") + 1:]
    return None


def subcommand(args: list[str]) -> list[str]:
    """`pipeline`, or `data inspect`, `config show`: the words before the command's own arguments."""
    return args[:2] if args and args[0] in ("data", "config", "model") else args[:1]


@cache
def flags_of(*words: str) -> frozenset[str]:
    """The option strings `rlhfkit WORDS --help` lists, from the CLI's own parser."""
    import argparse

    from rlhfkit.cli import build_parser

    parser = build_parser()
    for word in words:
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        assert word in subparsers.choices, f"rlhfkit has no command {' '.join(words)}"
        parser = subparsers.choices[word]
    return frozenset(s for a in parser._actions for s in a.option_strings)


def test_readme_is_a_guide_not_a_reference():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_the_two_ci_commands_are_in_readme_verbatim():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]
    assert len(ci) == 2, ci
    readme_lines = {line.strip() for body in readme_blocks("bash") for line in body.splitlines()}
    for command in ci:
        assert command in readme_lines, f".ci/run calls {command!r}, which README no longer shows"


def test_every_repository_path_in_a_command_exists():
    named = {word for cmd in readme_commands() for word in cmd
             if word.split("/")[0] in REPO_DIRS and "=" not in word}
    assert named, "README names no repository file in its commands"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"README's commands name files that do not exist: {missing}"


def test_every_flag_of_an_rlhfkit_command_exists():
    checked = 0
    for cmd in readme_commands():
        args = rlhfkit_argv(cmd)
        if not args:
            continue
        words = subcommand(args)
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert flag in flags_of(*words), f"`rlhfkit {' '.join(words)}` has no flag {flag} (README: {shlex.join(cmd)})"
            checked += 1
    assert checked, "README shows no rlhfkit flag"


def test_every_config_and_override_in_a_command_loads():
    """Each command's config file with its `section.key=value` overrides validates against the schema."""
    from rlhfkit.config import load_config

    seen = 0
    for cmd in readme_commands():
        args = rlhfkit_argv(cmd)
        if not args:
            continue
        rest = args[len(subcommand(args)):]
        configs = [a for a in rest if a.endswith(".yaml")]
        overrides = [a for a in rest if re.match(r"^[a-z_]+(\.[\w]+)+=", a)]
        if configs:
            load_config(REPO / configs[0], overrides)
            seen += len(overrides)
        else:
            assert not overrides, f"overrides without a config: {shlex.join(cmd)}"
    assert seen, "README shows no override"


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_every_yaml_block_is_a_valid_config_fragment():
    """Keys and values of each YAML block validate as part of a config (with a dataset where it has none)."""
    from rlhfkit.config import Config

    blocks = readme_blocks("yaml")
    assert blocks
    for body in blocks:
        fragment = yaml.safe_load(body)
        Config.model_validate(_deep_merge({"data": {"datasets": [{"name": "any", "path": "any.jsonl"}]}}, fragment))


def test_the_python_reward_runs_as_the_yaml_block_configures_it(tmp_path):
    """The reward function README shows, saved under the name its YAML block gives, loads through the
    python source and scores a batch."""
    from rlhfkit.rewards.sources import build_text_sources

    (code,) = readme_blocks("python")
    filename = code.splitlines()[0].lstrip("# ").split(":")[0]
    (tmp_path / filename).write_text(code)
    sources = [s for body in readme_blocks("yaml") for s in (yaml.safe_load(body).get("ppo", {})
                                                              .get("reward", {}).get("sources", []))]
    python = [s for s in sources if s["type"] == "python"]
    assert python and python[0]["function"].startswith(filename + ":")
    (source,) = build_text_sources(python, base_dir=tmp_path)
    assert source(["Hi?", "Hi?"], ["one two three", "one"], [{}, {}]) == [3.0, 1.0]


@pytest.mark.parametrize("command", RUNS)
def test_readme_command_runs(command, tmp_path):
    assert shlex.split(command) in readme_commands(), f"{command!r} is not in README any more"
    if command in NEEDS_SHARED and not SHARED.is_dir():
        pytest.skip(f"needs {SHARED}")
    argv = [str(RLHFKIT), *shlex.split(command)[1:]]
    if argv[1] in ("data", "sft", "rm", "dpo", "ppo", "pipeline", "eval", "export"):  # outputs into tmp_path
        argv += [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHFKIT_SHARED": str(SHARED)}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr


def test_layout_matches_the_source_tree():
    """Each name the layout block lists is a module or package of src/rlhfkit, and every package and module is."""
    (layout,) = [body for lang, body in fenced_blocks(README.read_text(encoding="utf-8"))
                 if not lang and body.startswith("src/rlhfkit/")]
    src = REPO / "src" / "rlhfkit"
    listed_packages, listed_modules = set(), set()
    for line in layout.splitlines():
        head, *names = line.split()
        if head == "src/rlhfkit/":
            where = src
        elif head.startswith("configs/"):
            assert all((REPO / "configs" / n).exists() or (REPO / "configs" / f"{n}.yaml").exists() for n in names)
            continue
        else:
            where = src / head.rstrip("/")
            listed_packages.add(where.relative_to(src).as_posix())
        assert where.is_dir(), f"README layout lists {head}, which src/rlhfkit does not have"
        for name in names:
            assert (where / f"{name}.py").is_file() or (where / name.rstrip("/")).is_dir(), \
                f"README layout lists {head} {name}, which does not exist"
            listed_modules.add((where / f"{name}.py").relative_to(src).as_posix())
    packages = {p.parent.relative_to(src).as_posix() for p in src.rglob("__init__.py") if p.parent != src}
    assert packages <= listed_packages, f"packages missing from README's layout: {sorted(packages - listed_packages)}"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py") if p.name != "__init__.py"}
    assert modules <= listed_modules, f"modules missing from README's layout: {sorted(modules - listed_modules)}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m.group(1))]


def test_every_link_in_readme_and_docs_resolves():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for link in _links(page):
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(REPO)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(REPO)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_readme_or_the_index():
    linked = {(page.parent / link.partition("#")[0]).resolve()
              for page in (README, DOCS / "README.md") for link in _links(page)}
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and p.resolve() not in linked]
    assert not orphans, f"docs pages neither README nor docs/README.md links to: {orphans}"
    index = {(DOCS / link.partition("#")[0]).resolve() for link in _links(DOCS / "README.md")}
    unindexed = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and p.resolve() not in index]
    assert not unindexed, f"docs/README.md does not index: {unindexed}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

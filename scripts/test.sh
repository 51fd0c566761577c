#!/usr/bin/env bash
# Runs the test suite in the project's virtualenv (made by scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${RLHFKIT_VENV:-.venv}/bin/python" -m pytest "$@"

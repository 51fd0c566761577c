#!/usr/bin/env bash
# On a machine WITH internet: fill benchmarks/wheels with what gpu_check.sh installs offline on a GPU machine
# that has torch, transformers and peft but not DeepSpeed. Pass the GPU machine's Python version and platform
# when they differ from this one's:
#   bash benchmarks/gpu_wheels.sh                       # this machine's python and platform
#   PYVER=3.11 PLATFORM=manylinux2014_x86_64 bash benchmarks/gpu_wheels.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHEELS="$HERE/wheels"
PYTHON="${PYTHON:-python3}"
DEEPSPEED="${DEEPSPEED:-deepspeed==0.19.8}"   # the version rlhfkit is tested with
mkdir -p "$WHEELS"
# DeepSpeed ships as a source archive only: build a pure-Python wheel (its ops compile just in time on the GPU
# machine) against the torch installed here, without its dependencies (downloaded as wheels below).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" "$DEEPSPEED"
target=()
if [[ -n "${PYVER:-}" || -n "${PLATFORM:-}" ]]; then
  target=(--only-binary=:all: --python-version "${PYVER:?set PYVER too}" --platform "${PLATFORM:?set PLATFORM too}")
fi
# DeepSpeed's dependencies, and rlhfkit's own besides torch / transformers / peft.
"$PYTHON" -m pip download "${target[@]}" -d "$WHEELS" hjson ninja py-cpuinfo msgpack psutil einops packaging \
  pydantic pyyaml platformdirs filelock tqdm tensorboard gguf datasets pyarrow accelerate matplotlib
ls "$WHEELS"

#!/usr/bin/env bash
# GPU readiness, in at most 8 minutes on one GPU, without internet:
#   1. the machine: GPU, bf16, torch / transformers / peft / DeepSpeed versions; DeepSpeed (and any other
#      missing dependency of rlhfkit) installed from the wheels placed beside this script
#      (benchmarks/wheels, made on a machine with internet by benchmarks/gpu_wheels.sh);
#   2. the tiny pipeline (configs/tiny.yaml: data, sft, rm, ppo, eval, export) on the GPU;
#   3. one SmolLM2-135M SFT, RM and PPO step each, bf16, at ZeRO-0 and at ZeRO-3;
#   4. benchmarks/rollout.py: plain model.generate vs the rollout path in each of its decoding loops (dynamic,
#      static cache, and static cache compiled: CUDA graphs), with whether they sampled the same tokens.
# Each figure is printed as it comes; a part that fails or runs out of time is said, and the rest go on.
#
#   bash benchmarks/gpu_check.sh                      # everything, 480 s budget
#   GPU_CHECK_PARTS="env tiny" bash benchmarks/gpu_check.sh
#   GPU_CHECK_ALLOW_CPU=1 ...                         # run the parts without a GPU (a dry run of the script)
# Environment: PYTHON (default: the repo's .venv if present, else python3), GPU_CHECK_BUDGET_S (480),
# GPU_CHECK_OUT (a temp dir), RLHFKIT_SHARED (where ../shared's data lives).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
WHEELS="$HERE/wheels"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
PARTS="${GPU_CHECK_PARTS:-env tiny smol rollout}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t rlhfkit-gpu-check-XXXX)}"
START=$(date +%s)
FAILED=()

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RLHFKIT_SHARED="${RLHFKIT_SHARED:-$(dirname "$REPO")/shared}"
cd "$REPO" || exit 1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# run NAME CMD...: CMD within the time left, its output in $OUT/NAME.log (tail shown when it fails)
run() {
  local name="$1"; shift
  local budget; budget=$(left)
  if (( budget < 10 )); then say "$name: skipped, the ${BUDGET_S} s budget is spent"; FAILED+=("$name"); return 1; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then say "$name: ok in ${took} s"; return 0; fi
  if (( rc == 124 || rc == 137 )); then say "$name: stopped at the budget after ${took} s"; else say "$name: FAILED (exit $rc) after ${took} s"; fi
  tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
  FAILED+=("$name")
  return 1
}

figures() { "$PYTHON" "$HERE/gpu_check_figures.py" "$@"; }

part_env() {
  say "output in $OUT; python: $PYTHON"
  if ! "$PYTHON" - <<'EOF'
import sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}, devices: {torch.cuda.device_count()}")
for name in ("transformers", "peft"):
    try:
        print(f"{name} {__import__(name).__version__}")
    except ImportError:
        sys.exit(f"{name} is missing: this check expects torch, transformers and peft installed")
EOF
  then FAILED+=("env"); return 1; fi
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [[ -z "${GPU_CHECK_ALLOW_CPU:-}" ]]; then say "no CUDA GPU visible: stopping (GPU_CHECK_ALLOW_CPU=1 runs the parts anyway)"; exit 2; fi
    say "no GPU: running on CPU because GPU_CHECK_ALLOW_CPU is set (figures are not GPU figures)"
  fi
  install_missing
}

# DeepSpeed (and rlhfkit's other dependencies, if absent) from the wheels beside this script, never the network.
install_missing() {
  local missing
  missing=$("$PYTHON" - <<'EOF'
import importlib.util
modules = {"deepspeed": "deepspeed", "pydantic": "pydantic", "yaml": "pyyaml", "platformdirs": "platformdirs",
           "filelock": "filelock", "safetensors": "safetensors", "tensorboard": "tensorboard", "gguf": "gguf",
           "datasets": "datasets", "pyarrow": "pyarrow", "accelerate": "accelerate", "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None))
EOF
)
  if [[ -z "$missing" ]]; then
    say "dependencies: all present ($("$PYTHON" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1))"
    return 0
  fi
  say "installing from $WHEELS: $missing"
  if [[ ! -d "$WHEELS" ]]; then
    say "no $WHEELS: make it with benchmarks/gpu_wheels.sh on a machine with internet and copy it here"
    FAILED+=("install"); return 1
  fi
  # --no-build-isolation: a DeepSpeed sdist builds against the torch already installed (DS_BUILD_OPS=0: its
  # ops are compiled just in time on first use, as DeepSpeed does by default).
  # shellcheck disable=SC2086
  DS_BUILD_OPS=0 run install "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation $missing \
    && say "installed: $("$PYTHON" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1)"
}

part_tiny() {
  run tiny_pipeline "$PYTHON" -m rlhfkit.cli pipeline configs/tiny.yaml "run.output_dir=$OUT/tiny" --no-progress \
    && figures pipeline "$OUT/tiny"
}

# One SmolLM2 step of each stage, bf16, at one ZeRO stage. RM and PPO start from the previous stage's output.
# PPO samples with the dynamic loop: one step would time torch.compile, not the step (the tiny pipeline runs
# the default, compiled on a GPU; the rollout part times each loop).
part_smol_at() {
  local z="$1" dir="$OUT/smol-zero$1"
  local common=("run.output_dir=$dir" "--no-progress")
  run "smol_sft_zero$z" "$PYTHON" -m rlhfkit.cli sft configs/quickstart.yaml "${common[@]}" \
      sft.max_steps=1 sft.dtype=bfloat16 "sft.zero_stage=$z" sft.eval_every=0 sft.max_eval_batches=1 sft.save_every=0 \
    && figures stage "$dir" sft "SmolLM2 SFT step, bf16, ZeRO-$z"
  run "smol_rm_zero$z" "$PYTHON" -m rlhfkit.cli rm configs/quickstart.yaml "${common[@]}" \
      rm.max_steps=1 rm.dtype=bfloat16 "rm.zero_stage=$z" rm.eval_every=0 rm.max_eval_batches=1 rm.save_every=0 \
    && figures stage "$dir" rm "SmolLM2 RM step, bf16, ZeRO-$z"
  run "smol_ppo_zero$z" "$PYTHON" -m rlhfkit.cli ppo configs/quickstart.yaml "${common[@]}" \
      ppo.steps=1 ppo.eval_every=0 ppo.eval_prompts=8 ppo.save_every=0 ppo.rollout_dtype=bfloat16 \
      ppo.rollout_decoding=dynamic \
      ppo.actor.dtype=bfloat16 "ppo.actor.zero_stage=$z" ppo.critic.dtype=bfloat16 "ppo.critic.zero_stage=$z" \
      ppo.reference.dtype=bfloat16 ppo.reward.dtype=bfloat16 \
    && figures stage "$dir" ppo "SmolLM2 PPO step, bf16, actor and critic at ZeRO-$z"
}

part_smol() {
  part_smol_at 0
  part_smol_at 3
}

part_rollout() {
  run rollout "$PYTHON" benchmarks/rollout.py --batches 1,16 --new-tokens 64 --repeats 3 \
      --decodings dynamic,static,compiled && cat "$OUT/rollout.log"
}

for part in $PARTS; do
  case "$part" in
    env) part_env ;;
    tiny) part_tiny ;;
    smol) part_smol ;;
    rollout) part_rollout ;;
    *) say "unknown part '$part' (env, tiny, smol, rollout)"; FAILED+=("$part") ;;
  esac
done

say "done in $(( $(date +%s) - START )) s (budget ${BUDGET_S} s); logs in $OUT"
if (( ${#FAILED[@]} )); then say "not ok: ${FAILED[*]}"; exit 1; fi
say "all parts ok"

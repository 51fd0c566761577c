"""Precision chosen by the machine, and casts that keep a model the function it was trained as.

`auto` (the default of every model's `dtype`) resolves to
- bfloat16 where the hardware runs it natively and fast: a CUDA GPU with bf16, or a CPU with AVX512-BF16
  or AMX on which a bf16 matmul is also measured faster than fp32;
- float16 on a GPU without bf16 (trained with loss scaling);
- float32 everywhere else. On an AVX2-only CPU a bf16 matmul falls back to a slow path (measured 47x
  slower than fp32 on a 2-core AMD Zen 3), so no default may depend on bf16 being there. Native is not
  always fast either: on a 2-core Intel Xeon with AVX512-BF16 but no AMX, oneDNN's bf16 matmul ran at
  140 GFLOP/s against 252 in fp32 (a bf16 SFT step of SmolLM2 took 25 s, fp32 11 s), while a Zen 4 runs
  bf16 at ~420 against ~180. So on a CPU `auto` times one matmul in each precision once (~0.2 s; kept in
  the user cache per CPU model, thread count and torch version, so every process and stage agrees).

`RLHFKIT_NO_NATIVE_BF16=1` makes `auto` resolve as on a CPU without bf16 (fp32), to measure or test the
fp32 path on a machine that has bf16.

Half-precision casts touch parameters only: floating buffers (the rotary `inv_freq`) stay in fp32, as
DeepSpeed keeps them for the training engines. `module.to(torch.bfloat16)` would round `inv_freq` too and
turn a frozen copy into a different function from the model it copies (non-zero KL at PPO step 0).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("rlhfkit")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORCE_FP32_ENV = "RLHFKIT_NO_NATIVE_BF16"


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (and faster than fp32) on this CPU."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def forced_fp32() -> bool:
    return os.environ.get(FORCE_FP32_ENV, "") not in ("", "0")


def native_bf16() -> bool:
    """Whether bf16 is native, and the fast precision, where rlhfkit computes (the GPU when there is one,
    else the CPU: native instructions and a matmul measured faster than in fp32)."""
    if forced_fp32():
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16() and cpu_bf16_speedup() > 1.1


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU (a SmolLM2-sized projection), measured once and kept in
    the user cache, so that concurrent processes and later stages resolve `auto` alike."""
    return _measured_once("bf16_speedup", lambda: _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16))


@lru_cache(maxsize=None)
def matmul_peak_flops(dtype: str) -> float:
    """FLOP/s of a SmolLM2-sized projection matmul at `dtype` where rlhfkit computes (GPU or CPU), measured
    once per machine kind and kept in the user cache: the peak a training stage's utilisation is set against."""
    m, k, n = 1024, 576, 1536
    if torch.cuda.is_available():
        m, k, n = 8192, 4096, 4096
    return _measured_once(f"matmul_flops_{dtype}", lambda: 2.0 * m * k * n / _matmul_seconds(DTYPES[dtype], shape=(m, k, n)))


def measured_file(name: str) -> Path:
    """The user-cache file that keeps a measurement (_measured_once): delete it to measure again."""
    from ..paths import cache_root

    return cache_root() / ("cpu_bf16_speedup.json" if name == "bf16_speedup" else f"measured_{name}.json")


def _measured_once(name: str, measure) -> float:
    import json

    from filelock import FileLock

    if torch.cuda.is_available():
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "")
        where = f"{model}|{torch.get_num_threads()} threads"
    key = f"{where}|torch {torch.__version__}"
    path = measured_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        known = json.loads(path.read_text()) if path.is_file() else {}
        if key not in known:
            known[key] = measure()
            path.write_text(json.dumps(known, indent=1))
    return known[key]


def _matmul_seconds(dtype: torch.dtype, reps: int = 20, shape: tuple[int, int, int] = (1024, 576, 1536),
                    within_s: float = 1.0) -> float:
    """Seconds of the fastest of up to `reps` timed matmuls (at least 3, then as many as fit in within_s): the
    fastest is the machine's speed, the others carry whatever else ran at the time. The result is kept for
    good (_measured_once), so one measured under load would set a low peak for every later run."""
    import time

    m, k, n = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - began < within_s):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def auto_dtype() -> str:
    if native_bf16():
        return "bfloat16"
    if torch.cuda.is_available() and not forced_fp32():
        return "float16"
    return "float32"


def why_auto() -> str:
    """One phrase saying what `auto` saw."""
    if forced_fp32():
        return f"{FORCE_FP32_ENV} is set"
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()} ({'with' if native_bf16() else 'without'} bf16)"
    if not cpu_has_native_bf16():
        return "CPU without native bf16 (no AVX512-BF16/AMX)"
    return f"CPU with native bf16, bf16 matmul measured {cpu_bf16_speedup():.2f}x fp32's speed"


_warned: set[str] = set()


def resolve_dtype(name: str, where: str = "dtype") -> str:
    """`auto` → the machine's precision; an explicit bf16 on a CPU without it is kept, with one warning."""
    if name == "auto":
        return auto_dtype()
    if name == "bfloat16" and not torch.cuda.is_available() and where not in _warned:
        if not cpu_has_native_bf16():
            _warned.add(where)
            log.warning("%s: bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX) runs in a slow fallback, "
                        "often 10-50x slower than float32; use dtype: auto or float32", where)
        elif not forced_fp32() and cpu_bf16_speedup() < 1.0:
            _warned.add(where)
            log.warning("%s: bfloat16 matmuls on this CPU run at %.2fx fp32's speed (native bf16 without AMX); "
                        "dtype: auto would use float32", where, cpu_bf16_speedup())
    return name


def torch_dtype(name: str, where: str = "dtype") -> torch.dtype:
    return DTYPES[resolve_dtype(name, where)]


def cast_params(module: torch.nn.Module, dtype: torch.dtype, device=None) -> torch.nn.Module:
    """Move a module to `device` and cast its floating parameters to `dtype`, leaving buffers in their own
    precision (fp32 rotary frequencies), as the training engines do. Returns the module."""
    if device is not None:
        module.to(device)
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


def machine_summary() -> str:
    """The CPU/GPU kind beside every benchmark figure: capability, native bf16, what `auto` resolves to."""
    if torch.cuda.is_available():
        kind = f"GPU {torch.cuda.get_device_name()}"
    else:
        import platform

        model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
                     platform.processor() or "unknown CPU")
        kind = f"CPU {model}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}"
    if torch.cuda.is_available():
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
    elif cpu_has_native_bf16():
        bf16 = f"native bf16 (bf16 matmul {cpu_bf16_speedup():.2f}x fp32's speed)"
    else:
        bf16 = "no native bf16"
    forced = f", {FORCE_FP32_ENV}=1" if forced_fp32() else ""
    return f"{kind}; {bf16}{forced}; dtype auto → {auto_dtype()}"


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


# On a CPU, full-weight training in bf16 needs a learning rate whose Adam updates (about lr per element) reach
# half a bf16 step of most weights, or the compute copy the forward passes use hardly changes in a run of tens
# of steps (train/update_probe.py measures it every step). Measured on SmolLM2-135M's linear weights: the
# share of weights an update of size lr changes is 4% at 1e-5, 7% at 2e-5, 28% at 1e-4 and 52% at 2e-4.
# Below this rate `auto` trains full weights in fp32 on a CPU. LoRA factors (the B factor starts at zero)
# and value heads train in bf16 at any rate. GPU runs take thousands of steps, over which the fp32 master
# weights add up and show: there `auto` keeps bf16.
BF16_FULL_WEIGHTS_MIN_LR = 2e-4

_why_stage: dict[str, str] = {}


def auto_for_training(t, where: str) -> str:
    """`auto` for a trainable model: the machine's precision, unless that is half precision on a CPU and its
    full weights train at a learning rate whose updates would mostly vanish in the compute copy (fp32 then)."""
    dtype = auto_dtype()
    if dtype == "float32" or torch.cuda.is_available() or t.lora.enabled:
        return dtype
    if t.learning_rate < BF16_FULL_WEIGHTS_MIN_LR:
        _why_stage[where] = (f"{where}: float32, not {dtype}: its full weights train at learning rate "
                             f"{t.learning_rate:g}, below which most {dtype} updates vanish "
                             f"(BF16_FULL_WEIGHTS_MIN_LR {BF16_FULL_WEIGHTS_MIN_LR:g}; use LoRA or set the dtype)")
        return "float32"
    return dtype


def why_stage(where: str) -> str | None:
    """Why `auto` chose fp32 for this trainable model on a bf16 machine, if it did."""
    return _why_stage.get(where)


def resolve_precision(cfg):
    """A copy of the run config with every `auto` precision made concrete (idempotent). Trainable models by
    auto_for_training; reference, reward and rollouts default to the actor's precision (a sampler in another
    precision than the trainer is off-policy: its log-probs differ by up to 0.28 per token on SmolLM2 in bf16
    against fp32, docs/algorithms.md); everything else to the machine's."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, "model.dtype")
    for name in ("sft", "rm", "dpo"):
        section = getattr(cfg, name)
        section.dtype = auto_for_training(section, name) if section.dtype == "auto" else resolve_dtype(section.dtype, f"{name}.dtype")
    cfg.eval.dtype = resolve_dtype(cfg.eval.dtype, "eval.dtype")
    p = cfg.ppo
    for name in ("actor", "critic"):
        t = getattr(p, name)
        t.dtype = auto_for_training(t, f"ppo.{name}") if t.dtype == "auto" else resolve_dtype(t.dtype, f"ppo.{name}.dtype")
    for name in ("reference", "reward"):
        frozen = getattr(p, name)
        frozen.dtype = p.actor.dtype if frozen.dtype == "auto" else resolve_dtype(frozen.dtype, f"ppo.{name}.dtype")
    p.rollout_dtype = p.actor.dtype if p.rollout_dtype == "auto" else resolve_dtype(p.rollout_dtype, "ppo.rollout_dtype")
    return cfg

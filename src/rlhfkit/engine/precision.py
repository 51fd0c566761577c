"""Precision chosen by the machine, and casts that keep a model the function it was trained as.

`auto` (the default of every model's `dtype`) resolves to
- bfloat16 where the hardware runs it natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX;
- float16 on a GPU without bf16 (trained with loss scaling);
- float32 everywhere else. On an AVX2-only CPU a bf16 matmul falls back to a slow path (measured 47x
  slower than fp32 on a 2-core AMD Zen 3), so no default may depend on bf16 being there.

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
    """Whether bf16 is native where rlhfkit computes (the GPU when there is one, else the CPU)."""
    if forced_fp32():
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


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
    return f"CPU {'with' if cpu_has_native_bf16() else 'without'} native bf16 (AVX512-BF16/AMX)"


_warned: set[str] = set()


def resolve_dtype(name: str, where: str = "dtype") -> str:
    """`auto` → the machine's precision; an explicit bf16 on a CPU without it is kept, with one warning."""
    if name == "auto":
        return auto_dtype()
    if name == "bfloat16" and not torch.cuda.is_available() and not cpu_has_native_bf16() and where not in _warned:
        _warned.add(where)
        log.warning("%s: bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX) runs in a slow fallback, "
                    "often 10-50x slower than float32; use dtype: auto or float32", where)
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
    bf16 = "native bf16" if (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or (
        not torch.cuda.is_available() and cpu_has_native_bf16()) else "no native bf16"
    forced = f", {FORCE_FP32_ENV}=1" if forced_fp32() else ""
    return f"{kind}; {bf16}{forced}; dtype auto → {auto_dtype()}"


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def resolve_precision(cfg):
    """A copy of the run config with every `auto` precision made concrete (idempotent). Reference and
    reward default to the actor's precision; rollouts and everything else to the machine's."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, "model.dtype")
    for name in ("sft", "rm", "dpo", "eval"):
        section = getattr(cfg, name)
        section.dtype = resolve_dtype(section.dtype, f"{name}.dtype")
    p = cfg.ppo
    for name in ("actor", "critic"):
        getattr(p, name).dtype = resolve_dtype(getattr(p, name).dtype, f"ppo.{name}.dtype")
    for name in ("reference", "reward"):
        frozen = getattr(p, name)
        frozen.dtype = p.actor.dtype if frozen.dtype == "auto" else resolve_dtype(frozen.dtype, f"ppo.{name}.dtype")
    p.rollout_dtype = resolve_dtype(p.rollout_dtype, "ppo.rollout_dtype")
    return cfg

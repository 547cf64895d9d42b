"""What a result was measured on: hardware, threads, load and library versions (recorded on every benchmark row).

    hardware("cpu")  -> {"cpu", "cpu_flags", "native_bf16", "cpu_cores", "torch_threads", "load_average", "platform",
                         "device", (gpu, cuda)}
    cpu_flags()      -> frozenset({"avx2", "avx512f", "avx512_bf16"}): the CPU_FLAGS this CPU has (read once)
    native_bf16()    -> True where the CPU multiplies bf16 natively (avx512_bf16 / amx_bf16)
    versions()       -> {"python", "torch", "torchvision", "open_clip", "triton", "onnxruntime", ...}
    busy_warning()   -> a line when the machine's load exceeds the cores torch does not use, else None
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

# report key -> the distributions that provide it (the first installed one is reported)
PACKAGES = {"torchvision": ["torchvision"], "open_clip": ["open_clip_torch"], "triton": ["triton"],
            "onnxruntime": ["onnxruntime-gpu", "onnxruntime"], "onnx": ["onnx"], "numpy": ["numpy"],
            "scc": ["scc-defense"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set flags that decide how fast each dtype's matmuls run (names as in /proc/cpuinfo): bf16 is native
# with avx512_bf16 or amx_bf16 (x86) or bf16 (Arm), fp16 with avx512_fp16 or amx_fp16; without them that dtype's
# matmuls are many times slower than fp32's (scc.precision.check_dtype_on_device).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "bf16")
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
TORCH_NAMES = {"avx512f": "avx512_f"}  # where torch.cpu.get_capabilities() spells a flag differently


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU_FLAGS this CPU has, read once: from torch.cpu.get_capabilities() (cpuid, which also knows whether the
    OS enabled AMX) where torch has it, else from /proc/cpuinfo; empty where neither says."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        have = capabilities()
        return frozenset(f for f in CPU_FLAGS if have.get(TORCH_NAMES.get(f, f)) is True)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    words = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    return frozenset(CPU_FLAGS) & set(words)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 / amx_bf16, or Arm's bf16)."""
    return bool(NATIVE_BF16 & cpu_flags())


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def hardware(device: str | torch.device = "cpu") -> dict:
    info = {"cpu": cpu_name(), "cpu_flags": sorted(cpu_flags()), "native_bf16": native_bf16(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": load_average(),
            "platform": platform.platform(), "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def versions(extra: Sequence[str] = ()) -> dict:
    """Python, torch and the libraries a result depends on; `extra` names more distributions (e.g. "ray")."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for key, packages in [*PACKAGES.items(), *((name, [name]) for name in extra)]:
        for package in packages:
            try:
                out[key] = md.version(package)
                break
            except md.PackageNotFoundError:
                continue
    return out


def busy_warning() -> str | None:
    """One line when other work competes for the cores torch uses (timings are then unreliable)."""
    load, cores = load_average(), os.cpu_count() or 1
    free = cores - torch.get_num_threads()
    if load is not None and load > max(free, 0) + 0.5:
        return (f"warning: load average {load:.1f} on {cores} cores with {torch.get_num_threads()} torch threads: "
                "other work competes for the cores; read ratios measured in one run, not absolute times")
    return None

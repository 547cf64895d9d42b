"""The one timing harness: every benchmark (scc bench, the pytest-benchmark suite, benchmarks/cpu_compiled.py,
benchmarks/gpu_check.py, scc eval's seconds per image) times through these functions.

    warmup_s = warm_up(lambda: run(x, d), device, calls=1)        # untimed calls (compile, caches), timed apart
    seconds = time_calls(lambda: run(x, d), device, calls=20)     # one sample per call
    stats = summarize(seconds, per=batch)                        # median, p20, p80 (per image with per=batch)

`timed_call` is the unit: the device is synchronised before the clock starts and again inside the timed region
(CUDA kernels are asynchronous), so a sample is the call's whole device time. Report the median with p20/p80:
on a shared machine a mean is dragged by the slowest calls and a minimum hides them.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, device: torch.device | str = "cpu"):
    """(seconds, fn()) with the device synchronised before the start and inside the timed region."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def warm_up(fn: Callable, device: torch.device | str = "cpu", calls: int = 1) -> float:
    """Run `calls` untimed calls (compilation, allocator and cache warm-up); returns their total seconds."""
    total = 0.0
    with torch.no_grad():
        for _ in range(calls):
            total += timed_call(fn, device)[0]
    return total


def time_calls(fn: Callable, device: torch.device | str = "cpu", calls: int = 10) -> list[float]:
    """Seconds of each of `calls` calls of fn() (no gradient recorded)."""
    with torch.no_grad():
        return [timed_call(fn, device)[0] for _ in range(calls)]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated q-quantile (q in [0, 1])."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(seconds: Sequence[float], per: int = 1) -> dict:
    """{"median", "p20", "p80", "calls"} of the samples divided by `per` (e.g. the batch size: per image)."""
    if not seconds:
        raise ValueError("no timed calls to summarize")
    values = [s / per for s in seconds]
    return {"median": percentile(values, 0.5), "p20": percentile(values, 0.2), "p80": percentile(values, 0.8),
            "calls": len(values)}

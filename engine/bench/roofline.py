"""How close a defense runs to the machine's limit: FLOPs counted in a real run, the machine's measured matmul
peak, and on a GPU the batch-1 weight-streaming bound.

    flops = count_flops(defended, x)                 # FLOPs of one call, forward and input-gradient passes
    peak = matmul_peak(torch.bfloat16, "cpu")        # GFLOP/s of a large matmul on this machine, these threads
    row = roofline(flops / n, seconds_per_image, peak)   # {"gflop_per_image", "gflop_per_s", "peak_fraction"}

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` around one eager call: it sees every matmul and
convolution that runs, also inside `torch.func.grad` (so TTC on ViT-B/32 counts its 4 forwards and 2 input
gradients, ~2 forward-equivalents each). The count does not depend on dtype or backend, only on the
procedure. nn.MultiheadAttention's no-grad fast path (one fused native op) is switched off while counting: the
counter does not see the projections inside it (ViT-B/32: 5.9 instead of 8.8 GFLOP per forward). The peak is measured, not read from a spec sheet: a (M x K) @ (K x N) matmul timed for about a
second with the threads and dtype the benchmark uses, so "fraction of peak" compares like with like.
Weight streaming (GPU, batch 1): every sequential encoder round reads all weights once, so
    latency >= rounds x weight bytes / memory bandwidth   (bandwidth measured with a device-to-device copy).
"""
from __future__ import annotations

import time

import torch

from ..timing import sync


def count_flops(defended, x: torch.Tensor, draws: dict | None = None) -> int:
    """FLOPs of one eager call of `defended` on x (all images), counted as it runs."""
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused no-grad kernel hides the projections from the counter
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            defended(x, draws)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seconds: float = 1.0,
                size: tuple[int, int, int] | None = None) -> float:
    """Measured GFLOP/s of a large matmul (best of the timed calls) for `dtype` on `device` with the current
    torch threads. CPU: 768 x 768 @ 768 x 3072 (a ViT-B MLP at 768 tokens); CUDA: 8192^3."""
    device = torch.device(device)
    m, k, n = size or ((8192, 8192, 8192) if device.type == "cuda" else (768, 768, 3072))
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / best_seconds(lambda: a @ b, device, seconds) / 1e9


def best_seconds(fn, device: str | torch.device = "cpu", seconds: float = 1.0) -> float:
    """The fastest of repeated calls of `fn` over about `seconds` (after one warm-up call: allocator, kernel
    selection), the device synchronised inside each timed call: a peak-style measurement, not a median."""
    fn()
    sync(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(device: str | torch.device = "cuda", megabytes: int = 1024) -> float:
    """Measured GB/s of a device-to-device copy (read + write counted)."""
    device = torch.device(device)
    src = torch.empty(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def weight_bytes(classifier, dtype: torch.dtype) -> int:
    """Bytes of the image tower's weights in `dtype` (what one batch-1 encoder round streams)."""
    return sum(p.numel() for p in classifier.visual.parameters()) * torch.empty((), dtype=dtype).element_size()


def roofline(flops_per_image: float, seconds_per_image: float, peak_gflops: float | None) -> dict:
    achieved = flops_per_image / seconds_per_image / 1e9 if seconds_per_image > 0 else None
    return {"gflop_per_image": flops_per_image / 1e9, "gflop_per_s": achieved,
            "peak_gflop_per_s": peak_gflops,
            "peak_fraction": achieved / peak_gflops if achieved is not None and peak_gflops else None}

"""How close a defense runs to the machine's limit: FLOPs counted in a real run, the machine's measured matmul
peak, and on a GPU the batch-1 weight-streaming bound.

    flops = count_flops(defended, x)                 # FLOPs of one call, forward and input-gradient passes
    split = flops_per_image(defended, x, dtype=torch.bfloat16)   # {"bf16": ..., "fp32": ...}: who runs what
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}   # GFLOP/s, these threads
    row = roofline(split, seconds_per_image, peaks)
    # {"gflop_per_image", "gflop_per_image_by_dtype", "gflop_per_s", "peak_gflop_per_s", "peak_fraction"}

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` around one eager call: it sees every matmul and
convolution that runs, also inside `torch.func.grad` (so TTC on ViT-B/32 counts its 4 forwards and 2 input
gradients, ~2 forward-equivalents each). The count does not depend on dtype or backend, only on the
procedure. Which dtype runs them does: a reduced-precision row runs its image tower in bf16 but keeps fp32
where the method does (the patch stem, losses and logits; R-TPT's whole text tower, which it tunes), so
`flops_by_dtype` splits the count by the dtype of each operator's input, and a row's peak is the one its mix of
FLOPs could reach at best, sum_d flops_d / sum_d (flops_d / peak_d): R-TPT bf16 on ViT-B/32 spends 45 % of its
FLOPs in fp32, which a bf16-only peak would count at the bf16 rate. nn.MultiheadAttention's no-grad fast path
(one fused native op) is switched off while counting: the counter does not see the projections inside it
(ViT-B/32: 5.9 instead of 8.8 GFLOP per forward). The peak is measured, not read from a spec sheet: a
(M x K) @ (K x N) matmul timed for about a second with the threads and dtype the benchmark uses, so "fraction of
peak" compares like with like.
Weight streaming (GPU, batch 1): every sequential encoder round reads all weights once, so
    latency >= rounds x weight bytes / memory bandwidth   (bandwidth measured with a device-to-device copy).
"""
from __future__ import annotations

import time

import torch
from torch.utils import _pytree

from ..precision import DTYPES
from ..timing import sync


def count_flops(defended, x: torch.Tensor, draws: dict | None = None) -> int:
    """FLOPs of one eager call of `defended` on x (all images), counted as it runs."""
    return sum(flops_by_dtype(defended, x, draws).values())


def flops_by_dtype(defended, x: torch.Tensor, draws: dict | None = None) -> dict[str, int]:
    """FLOPs of one eager call of `defended` on x, split by the dtype of each counted operator's first tensor
    input: {"fp32": n, "bf16": m} (names as scc.precision.DTYPES; another dtype keeps torch's name; {"unknown": n}
    where this torch's counter cannot be split, so that no peak is guessed for it)."""
    from torch.utils.flop_counter import FlopCounterMode

    names = {v: k for k, v in DTYPES.items()}
    split: dict[str, int] = {}

    class Counter(FlopCounterMode):  # the stock counter, plus who ran each operator's FLOPs
        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.flop_counts["Global"][func_packet]
            out = super()._count_flops(func_packet, out, args, kwargs)
            added = self.flop_counts["Global"][func_packet] - before
            if added:
                dtype = next((a.dtype for a in _pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
                name = names.get(dtype, str(dtype).removeprefix("torch."))
                split[name] = split.get(name, 0) + int(added)
            return out

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused no-grad kernel hides the projections from the counter
    try:
        with Counter(display=False) as counter, torch.no_grad():
            defended(x, draws)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if sum(split.values()) != counter.get_total_flops():  # a torch whose counter no longer calls _count_flops:
        return {"unknown": int(counter.get_total_flops())}  # the total stays right, the row's peak is unknown
    return split


def flops_per_image(defended, x: torch.Tensor, draws: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """flops_by_dtype of `defended` with its image tower in `dtype` (Defended.with_dtype), per image of x: what a
    benchmark row at that dtype runs, and so the mix its peak is made of."""
    split = flops_by_dtype(defended.with_dtype(dtype), x, draws)
    return {k: v / len(x) for k, v in split.items()}


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


def mixed_peak(flops: dict[str, float], peaks: dict[str, float]) -> float | None:
    """The best GFLOP/s a mix of FLOPs ({dtype: flops}) can reach when each dtype's run at its own measured peak
    ({dtype: GFLOP/s}): total / sum_d (flops_d / peak_d). None when a dtype with FLOPs has no peak."""
    if not flops or any(n and not peaks.get(d) for d, n in flops.items()):
        return None
    seconds = sum(n / peaks[d] for d, n in flops.items() if n)
    return sum(flops.values()) / seconds if seconds > 0 else None


def roofline(flops_per_image: dict[str, float], seconds_per_image: float, peaks: dict[str, float]) -> dict:
    """The roofline columns of a row: FLOPs per image ({dtype: flops}, from flops_by_dtype), its median seconds per
    image and the measured peaks ({dtype: GFLOP/s}) -> GFLOP per image (total and by dtype), achieved GFLOP/s,
    the row's peak (mixed_peak) and the fraction of it achieved."""
    total = sum(flops_per_image.values())
    achieved = total / seconds_per_image / 1e9 if seconds_per_image > 0 else None
    peak = mixed_peak(flops_per_image, peaks)
    return {"gflop_per_image": total / 1e9,
            "gflop_per_image_by_dtype": {d: n / 1e9 for d, n in flops_per_image.items()},
            "gflop_per_s": achieved, "peak_gflop_per_s": peak,
            "peak_fraction": achieved / peak if achieved is not None and peak else None}

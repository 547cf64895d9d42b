"""Where a row's time goes: torch.profiler's operator table over a few calls, and the share spent in matmuls.

    report = operator_profile(lambda: runner(x, draws), calls=3)
    report["matmul_share"], report["top"][:5]        # self time per call of the heaviest operators

Self time is what an operator spends in its own code (its children excluded), so the shares add up: matmul ops
(aten::mm / addmm / bmm / baddbmm, oneDNN and MKL linear, Inductor's C++ GEMM templates) against everything else
(attention, layer norms, GELU, softmax, copies, the compiled graph's fused C++ kernels and the Python around them).
The wall time of the profiled calls is measured too: `unattributed` is the part of it no operator claims
(Python, the dispatcher, autograd bookkeeping between operators).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear", "mkl::_mkl_linear",
              "mkldnn::_linear_pointwise", "aten::mkldnn_linear", "aten::_weight_int8pack_mm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def is_matmul(name: str) -> bool:
    """An operator that is one matrix product (an Inductor GEMM template kernel counts: 'cpp_..._gemm...' or
    'cpp_CppMicroGemm...')."""
    return name in MATMUL_OPS or ("gemm" in name.lower() and name.startswith("cpp_"))


def operator_profile(fn: Callable[[], object], calls: int = 3, top: int = 15) -> dict:
    """torch.profiler (CPU) over `calls` calls of fn (no gradient recorded outside fn): per call, the wall seconds,
    the self seconds of matmuls, attention and the rest, and the `top` operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) / calls
    events = prof.key_averages()
    rows = sorted(({"op": e.key, "self_s": e.self_cpu_time_total / 1e6 / calls, "count": e.count / calls}
                   for e in events), key=lambda r: -r["self_s"])
    total = sum(r["self_s"] for r in rows)
    matmul = sum(r["self_s"] for r in rows if is_matmul(r["op"]))
    attention = sum(r["self_s"] for r in rows if r["op"] in ATTENTION_OPS)
    for r in rows:
        r["share"] = r["self_s"] / wall if wall else None
    return {"calls": calls, "wall_s": wall, "operator_self_s": total, "matmul_s": matmul, "attention_s": attention,
            "matmul_share": matmul / wall if wall else None,
            "outside_matmul_share": 1 - matmul / wall if wall else None,
            "attention_share": attention / wall if wall else None,
            "unattributed_share": max(wall - total, 0.0) / wall if wall else None,
            "top": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:top]]}


def format_profile(label: str, report: dict) -> str:
    head = (f"{label}: {report['wall_s']:.4f} s/call; matmul {100 * report['matmul_share']:.1f} %, attention "
            f"{100 * report['attention_share']:.1f} %, other operators "
            f"{100 * (report['operator_self_s'] - report['matmul_s'] - report['attention_s']) / report['wall_s']:.1f} %"
            f", unattributed {100 * report['unattributed_share']:.1f} %")
    lines = [head] + [f"    {r['op'][:60]:<60}{1e3 * r['self_s']:>10.2f} ms{r['count']:>8g} x{100 * r['share']:>7.1f} %"
                      for r in report["top"]]
    return "\n".join(lines)

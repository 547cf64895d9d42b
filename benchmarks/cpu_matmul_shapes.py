"""The matmul ceiling of ViT-B-32 at its own shapes: GFLOP/s of each linear layer of one transformer block (forward
and input-gradient products) at the token counts the defenses run, against the bench's square-ish peak.

    .venv/bin/python benchmarks/cpu_matmul_shapes.py --threads 1,2 --dtype fp32,bf16 \\
        --json benchmarks/results/cpu-matmul-shapes-vitb32.json

Why: `scc bench` reports each row's GFLOP/s as a fraction of a 768 x 768 @ 768 x 3072 matmul (scc.bench.roofline).
At batch 1 a ViT-B-32 forward multiplies 50-token activations (49 patches + the class token) by 768 x 2304, 768 x 768,
768 x 3072 and 3072 x 768 weights; its input-gradient pass multiplies by their transposes. This script times those
products through `F.linear` (what the eager tower runs; the compiled engine's frozen, pre-packed kernels are at most
as fast per FLOP at these shapes, see the README) at M = 50 x {1, 2, 4, 8} rows (one image; TTC's two independent
passes; SCC's four views; batch 8), and reports the FLOP-weighted GFLOP/s of a whole block (forward + input
gradient) and its fraction of the peak, first with one block's weights reused (hot in the caches), then as a whole
tower pass over 12 blocks' own weights, forward and input gradient (each weight read from memory once per pass, as
in the model): the ceiling a row can reach while its time is in matmuls.
Every product is timed as the best of repeated calls for `--window-s` seconds (as the peak is), threads set per row.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scc.bench.roofline import best_seconds, matmul_peak
from scc.cli.args import deprecated_flag
from scc.precision import dtype_name, parse_dtypes
from scc.provenance import hardware, versions

# (name, in_features K, out_features N) of one ViT-B block's linear layers; attention's two batched products
# (q k^T and attn v: 12 heads x 50 x 64 x 50) are 2.6 % of the block's FLOPs at 50 tokens and left out
BLOCK = [("qkv", 768, 2304), ("out_proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)]
TOKENS = 50
LAYERS = 12


def best_gflops(fn, flops: float, seconds: float) -> float:
    return flops / best_seconds(fn, "cpu", seconds) / 1e9


def measure(threads: int, dtype: torch.dtype, multiples: list[int], seconds: float) -> list[dict]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    peak = matmul_peak(dtype, "cpu", seconds)  # measured again after the rows; the better of the two is kept
    rows = []
    for mult in multiples:
        m = TOKENS * mult
        total_flops, total_time, layers = 0.0, 0.0, {}
        for name, k, n in BLOCK:
            w = torch.randn(n, k, generator=gen).to(dtype)  # nn.Linear's (out, in) weight
            for direction, (x, weight) in {"forward": (torch.randn(m, k, generator=gen).to(dtype), w),
                                           "input_grad": (torch.randn(m, n, generator=gen).to(dtype), w.t())}.items():
                flops = 2.0 * m * k * n
                g = best_gflops(lambda: F.linear(x, weight), flops, seconds)
                layers[f"{name}.{direction}"] = round(g, 1)
                total_flops += flops
                total_time += flops / (g * 1e9)
        block = total_flops / total_time / 1e9
        # a whole tower pass: 12 blocks with their own weights, so each weight comes from memory once per pass
        # (86 M parameters: 340 MB in fp32, 170 MB in bf16, far beyond the caches), forward then input gradient
        tower = [[torch.randn(n, k, generator=gen).to(dtype) for _, k, n in BLOCK] for _ in range(LAYERS)]
        xs = {k: torch.randn(m, k, generator=gen).to(dtype) for k in {k for _, k, _ in BLOCK} | {n for *_, n in BLOCK}}

        def tower_pass():
            for ws in tower:
                for w in ws:
                    F.linear(xs[w.shape[1]], w)
                    F.linear(xs[w.shape[0]], w.t())

        streamed = best_gflops(tower_pass, LAYERS * total_flops, seconds * 4)  # total_flops: one block, fwd + grad
        rows.append({"threads": threads, "dtype": dtype_name(dtype), "rows_m": m, "images_or_views": mult,
                     "block_gflops": round(block, 1), "tower_pass_gflops": round(streamed, 1),
                     "peak_gflops": round(peak, 1), "fraction_of_peak": round(block / peak, 3),
                     "tower_fraction_of_peak": round(streamed / peak, 3), "layers_gflops": layers})
        print(f"threads {threads}  {dtype_name(dtype):4}  M={m:4d}  block (weights in cache) {block:7.1f} GFLOP/s "
              f"{block / peak:6.1%}   tower pass (weights from memory) {streamed:7.1f} {streamed / peak:6.1%}   "
              f"peak {peak:7.1f}", flush=True)
    peak = max(peak, matmul_peak(dtype, "cpu", seconds))
    for row in rows:
        row.update(peak_gflops=round(peak, 1), fraction_of_peak=round(row["block_gflops"] / peak, 3),
                   tower_fraction_of_peak=round(row["tower_pass_gflops"] / peak, 3))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--multiples", default="1,2,4,8", help="rows per product in units of 50 tokens")
    p.add_argument("--window-s", type=float, default=0.5, metavar="S",
                   help="timing window per product in seconds (best call kept)")
    deprecated_flag(p, "--seconds", "--window-s")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.json:
        out = Path(args.json)
        if not out.parent.is_dir():
            p.error(f"--json {out}: folder {out.parent} does not exist; create it or pick another path")
    rows = []
    started = time.perf_counter()
    for threads in [int(t) for t in args.threads.split(",")]:
        for dtype in parse_dtypes(args.dtype):
            rows += measure(threads, dtype, [int(m) for m in args.multiples.split(",")], args.window_s)
    report = {"hardware": hardware("cpu"), "versions": versions(), "tokens_per_image": TOKENS, "block": BLOCK,
              "wall_s": round(time.perf_counter() - started, 1), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

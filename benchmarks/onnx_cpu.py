"""Measure batch-dynamic vs fixed-batch ONNX files on this CPU: export time, file size, ORT vs eager latency.

    python benchmarks/onnx_cpu.py                                  # bundled model: TTC and SCC-latency
    python benchmarks/onnx_cpu.py --vit                             # + ViT-B-32 TTC (random weights), once
    python benchmarks/onnx_cpu.py --out benchmarks/results/onnx-dynamic-cpu.json
    python benchmarks/onnx_cpu.py --fp16 --batches 8 --out benchmarks/results/onnx-fp16-cpu.json   # + fp16 files

One thread everywhere (torch and ONNX Runtime intra-op). Every file takes the draws as inputs, so eager and ORT
run on identical draws (top-1 agreement is reported). Latency: per image, median over `--repeats` calls, eager
and the ORT sessions alternating call by call so that a busy machine slows all of them alike; ratios come from
the same run. The load average at start and end is recorded (the machine may be shared).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import scc
from scc.data import load_dataset
from scc.metrics import top1_agreement
from scc.provenance import cpu_flags, cpu_name, native_bf16

from scc.export import OrtDefended, export_onnx


def environment() -> dict:
    versions = {}
    for package in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxoptimizer", "onnxruntime-gpu", "onnxruntime",
                    "open_clip_torch"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return {"threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": 1,
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "cpu": cpu_name(), "cpu_flags": sorted(cpu_flags()), "native_bf16": native_bf16(), "cores": os.cpu_count(),
            "python": platform.python_version(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _export(defended, folder: Path, tag: str, batch_size: int | None,
            dtype: torch.dtype = torch.float32) -> tuple[dict, OrtDefended]:
    suffix = "" if dtype == torch.float32 else "-fp16"
    path = folder / f"{tag}-{'dynamic' if batch_size is None else f'b{batch_size}'}{suffix}.onnx"
    info = export_onnx(defended, path, batch_size=batch_size, draws_as_inputs=True, dtype=dtype)
    return {"export_s": round(info["seconds"], 2), "trace_s": round(info["trace_seconds"], 2),
            "mb": round(info["bytes"] / 1e6, 3), "nodes": info["nodes"], "skipped_passes": info["skipped_passes"]}, \
        OrtDefended(path, threads=1)


def _latency(runners: dict, x: torch.Tensor, draws: dict, repeats: int) -> dict[str, float]:
    """ms per image of each runner(x, draws), interleaved call by call; median over `repeats`."""
    times = {name: [] for name in runners}
    for name, run in runners.items():  # warm-up
        run(x, draws)
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(x, draws)
            times[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(t) * 1e3 / x.shape[0], 3) for name, t in times.items()}


def measure_model(model: str, defenses: list[tuple[str, str]], batches: list[int], repeats: int, folder: Path,
                  latency: bool = True, fp16: bool = False) -> list[dict]:
    """fp16: also a fixed-batch fp16 file per batch (`--dtype fp16`), timed beside the others ("ort_fixed_fp16")
    with its top-1 agreement with the fp32 eager module on the same draws."""
    if model == "scc-tiny-digits":
        clf, pool = scc.load(model), load_dataset("digits", 32).images
    else:
        torch.manual_seed(0)
        clf = scc.load(model, None, ["cat", "dog", "car"])
        pool = torch.rand(max(batches), 3, clf.image_size, clf.image_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, preset in defenses:
        defended = scc.defend(clf, name, preset=preset)
        tag = f"{model}-{name}-{preset}"
        dynamic_info, dynamic = _export(defended, folder, tag, None)
        row = {"model": model, "defense": name, "preset": preset, "spec": defended.spec, "dynamic": dynamic_info,
               "fixed": {}}
        for b in batches:
            fixed_info, fixed = _export(defended, folder, tag, b)
            row["fixed"][str(b)] = fixed_info
            runs = {"dynamic": dynamic, "fixed": fixed}
            if fp16:
                half_info, runs["fixed_fp16"] = _export(defended, folder, tag, b, torch.float16)
                row.setdefault("fixed_fp16", {})[str(b)] = half_info
            if not latency:
                continue
            row["reference"] = "eager fp32, same draws"  # of top1_agreement
            x = pool[:b]
            draws = defended.draws(x)
            with torch.no_grad():
                eager = defended(x, draws)
            agreement = {k: top1_agreement(run(x, draws), eager) for k, run in runs.items()}
            ms = _latency({"eager": lambda x, d: defended(x, d), **{f"ort_{k}": r for k, r in runs.items()}},
                          x, draws, repeats)
            row.setdefault("latency_ms_per_image", {})[str(b)] = {
                **ms, "eager_over_ort_dynamic": round(ms["eager"] / ms["ort_dynamic"], 2),
                "ort_fixed_over_ort_dynamic": round(ms["ort_fixed"] / ms["ort_dynamic"], 3),
                **({"ort_fixed_fp16_over_ort_fixed": round(ms["ort_fixed_fp16"] / ms["ort_fixed"], 3)} if fp16 else {}),
                "top1_agreement": agreement}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/onnx_cpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/onnx-dynamic-cpu.json")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--vit", action="store_true", help="also ViT-B-32 TTC (random weights): export only")
    parser.add_argument("--only-vit", action="store_true", help="ViT-B-32 only, merged into an existing --out")
    parser.add_argument("--batches", default="1,8", help="fixed batch sizes (default: %(default)s)")
    parser.add_argument("--fp16", action="store_true", help="also fp16 fixed-batch files (`--dtype fp16`)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    report = json.loads(out.read_text()) if args.only_vit and out.exists() else {}
    report.update({"what": "batch-dynamic vs fixed-batch ONNX export (draws as inputs) and ONNX Runtime CPU latency",
                   "env": environment(), "load_average_start": os.getloadavg()})
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_vit:
            report["rows"] = measure_model("scc-tiny-digits", [("ttc", "paper"), ("scc", "latency")],
                                           [int(b) for b in args.batches.split(",")], args.repeats, Path(tmp),
                                           fp16=args.fp16)
        if args.vit or args.only_vit:
            report["vit_b32"] = measure_model("ViT-B-32", [("ttc", "paper")], [1], 0, Path(tmp), latency=False)
    report["load_average_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Operator profiles of the defenses on this CPU: where each row's time goes (matmuls vs the rest).

    .venv/bin/python benchmarks/cpu_profile.py --model ViT-B-32 --threads 2 \\
        --defenses ttc-official,ttc,scc-latency --backends eager,compiled --dtype fp32,bf16 --batch-size 1 \\
        --tag before

Every row replays the same images and draws. Per row: the median seconds per image over `--rounds` interleaved
calls (rows round-robin, so load that comes and goes hits them alike), then torch.profiler over `--profile-calls`
calls (scc.bench.profile): self time of the top operators and the share of the call spent in matmuls. The
compiled rows are built with Inductor's per-kernel profiler records on (`cpp.enable_kernel_profile`), so the
fused C++ kernels appear by name. Writes benchmarks/results/cpu-profile-<model>-<tag>.json (the model spelt vitb32,
scc-tiny-digits, ...) and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import scc
from scc.backends import make_runner
from scc.bench.latency import prepare
from scc.bench.official import LABEL as OFFICIAL, official_ttc
from scc.bench.profile import format_profile, operator_profile
from scc.bench.report import model_slug
from scc.defenses import split_spec
from scc.metrics import top1_agreement
from scc.precision import dtype_name, parse_dtypes
from scc.provenance import hardware, versions
from scc.timing import summarize, timed_call

RESULTS = Path(__file__).resolve().parent / "results"


def build_rows(clf, x, labels, backends, dtypes, batch, log):
    """[(label, backend, dtype, run(x, draws), draws)]; the draws of every TTC-like row are TTC's."""
    rows = []
    for label in labels:
        if label == OFFICIAL:
            draws = scc.defend(clf, "ttc", seed=0).draws(x)
            rows.append((label, "eager", "fp32", lambda x, d: official_ttc(clf, x, d["start"]), draws, None))
            continue
        defended = scc.defend(clf, label, seed=0)
        draws = defended.draws(x)
        for backend in backends:
            for dtype in dtypes:
                start = time.perf_counter()
                runner = make_runner(defended, backend, batch, dtype=dtype)
                log(f"built {label} {backend} {dtype_name(dtype)} in {time.perf_counter() - start:.1f} s")
                rows.append((label, backend, dtype_name(dtype), runner, draws, runner.compile_seconds))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--defenses", default=f"{OFFICIAL},ttc,scc-latency")
    p.add_argument("--backends", default="eager,compiled")
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="interleaved timed calls per row")
    p.add_argument("--profile-calls", type=int, default=3)
    p.add_argument("--tag", default="now")
    p.add_argument("--kernel-profile", type=int, default=1, help="Inductor per-kernel profiler records (1/0)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = bool(args.kernel_profile)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    load_at_start = os.getloadavg()[0]
    clf, x, _, pixels = prepare(args.model, None, args.batch_size)
    labels = [s.strip() for s in args.defenses.split(",") if s.strip()]
    rows = build_rows(clf, x, labels, args.backends.split(","), parse_dtypes(args.dtype), args.batch_size, log)
    outputs = {}
    with torch.no_grad():
        for i, (label, backend, dt, run, draws, _) in enumerate(rows):  # warm-up; the answers compared below
            outputs[i] = run(x, draws)
        seconds = {i: [] for i in range(len(rows))}
        for _ in range(args.rounds):
            for i, (label, backend, dt, run, draws, _) in enumerate(rows):
                seconds[i].append(timed_call(lambda: run(x, draws))[0])
    results = []
    for i, (label, backend, dt, run, draws, compile_s) in enumerate(rows):
        prof = operator_profile(lambda: run(x, draws), calls=args.profile_calls)
        stats = summarize(seconds[i], per=args.batch_size)
        base = next((outputs[j] for j, r in enumerate(rows) if r[0] == ("ttc" if label == OFFICIAL else label)
                     and r[1:3] == ("eager", "fp32")), outputs[i])  # eager fp32 on the same draws
        out = outputs[i]
        name, preset = split_spec(label)
        row = {"defense": name, "preset": preset, "spec": label, "backend": backend, "dtype": dt,
               "batch_size": args.batch_size, "s_per_image": stats["median"], "p20": stats["p20"], "p80": stats["p80"],
               "timed_calls": stats["calls"], "compile_s": compile_s, "top1_agreement": top1_agreement(out, base),
               "profile": prof}
        results.append(row)
        print(format_profile(f"{label} {backend} {dt} (median {stats['median']:.4f} s/image)", prof), flush=True)
    report = {"command": " ".join(sys.argv), "model": args.model, "pixels": pixels, "batch_size": args.batch_size,
              "threads": args.threads, "reference": "eager fp32, same draws (TTC's for the official TTC)",
              "load_average_at_start": load_at_start,
              "load_average_at_end": os.getloadavg()[0], "hardware": hardware("cpu"), "versions": versions(),
              "rows": results}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu-profile-{model_slug(args.model)}-{args.tag}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

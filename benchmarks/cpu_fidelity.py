"""Top-1 agreement of the fast rows with eager fp32 on many images (the Table 4 bench times only a few).

    .venv/bin/python benchmarks/cpu_fidelity.py --model ViT-B-32 --images 64 \\
        --defenses ttc,scc-latency --threads 2 --json benchmarks/results/cpu-fidelity-vitb32.json

For each defense: eager fp32 (the reference), eager bf16 and the compiled engine in fp32 and bf16 (batch
`--batch-size`) on the same images and draws; reported: top-1 agreement with the reference, and the largest and
median logit difference. A fresh seed of the defense's own draws (eager fp32, seed 1) is the yardstick: precision
and compilation should change fewer answers than redrawing the defense's randomness does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import scc
from scc.backends import make_runner
from scc.bench.latency import prepare
from scc.metrics import top1_agreement
from scc.precision import DTYPES
from scc.provenance import hardware, versions


def run_all(runner, x, draws, batch):
    with torch.no_grad():
        return torch.cat([runner(x[i: i + batch], {k: v[i: i + batch] for k, v in draws.items()})
                          for i in range(0, len(x), batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--defenses", default="ttc,scc-latency")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clf, x, _, pixels = prepare(args.model, None, args.images)
    report = {"command": " ".join(sys.argv), "model": args.model, "pixels": pixels, "images": args.images,
              "reference": "eager fp32 with seed 0: the same draws, except the row 'fp32 fresh seed' (seed 1)",
              "load_average_at_start": os.getloadavg()[0], "rows": []}
    for spec in args.defenses.split(","):
        defended = scc.defend(clf, spec, seed=0)
        draws = defended.draws(x)
        reference = run_all(make_runner(defended, "eager", args.batch_size), x, draws, args.batch_size)
        fresh_seed = scc.defend(clf, spec, seed=1)
        fresh = run_all(make_runner(fresh_seed, "eager", args.batch_size), x, fresh_seed.draws(x), args.batch_size)
        rows = [("eager", "fp32 fresh seed", fresh)]
        for backend, dt in (("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16")):
            runner = make_runner(defended, backend, args.batch_size, dtype=DTYPES[dt])
            rows.append((backend, dt, run_all(runner, x, draws, args.batch_size)))
        for backend, dt, out in rows:
            diff = (out - reference).abs()
            row = {"defense": defended.defense, "spec": spec, "backend": backend, "dtype": dt,
                   "top1_agreement": top1_agreement(out, reference),
                   "max_abs_logit_diff": diff.max().item(), "median_abs_logit_diff": diff.median().item()}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    report.update(load_average_at_end=os.getloadavg()[0], hardware=hardware("cpu"), versions=versions())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

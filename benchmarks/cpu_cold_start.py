"""Replica cold start of the compiled engine: compiling from nothing vs loading shipped AOTInductor packages.

    .venv/bin/python benchmarks/cpu_cold_start.py --model ViT-B-32 --defense ttc \\
        --dtype bf16 --buckets 1 --threads 2 --json benchmarks/results/cpu-cold-start-vitb32.json

Each phase is a fresh Python process with its own empty Inductor cache folder (TORCHINDUCTOR_CACHE_DIR), doing
what a replica does before its first request: import scc, load the model (random weights drawn from a seed, the
47 DTD classes), build scc.backends.compiled.Engine and warm up every bucket.

- `compile`:  Engine(...).warmup(b) compiles each bucket (torch.compile, cold caches).
- `build`:    Engine(...).build_packages(folder): the AOTInductor packages (scc.backends.packages), built once.
- `package`:  Engine(..., packages=folder).warmup(b) loads each bucket's package instead of compiling.

Reported per phase: seconds from process start to ready (`ready_s`, the replica's cold start), the part of it
spent compiling or loading per bucket, and for `compile` and `package` one timed call and its top-1 agreement with
the eager module in the same dtype on the same images and draws.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
import scc
from scc.backends.compiled import Engine
from scc.bench.latency import prepare
from scc.metrics import top1_agreement
from scc.precision import DTYPES
from scc.timing import timed_call
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
clf, x, _, _ = prepare(a["model"], None, max(a["buckets"]))
defended = scc.defend(clf, a["defense"], seed=0)
dtype = DTYPES[a["dtype"]]
engine = Engine(defended, max_batch=max(a["buckets"]), dtype=dtype, packages=a["packages"])
loaded = time.perf_counter() - start
out = {"model_loaded_s": round(loaded, 2), "threads": torch.get_num_threads()}
if a["phase"] == "build":
    infos = engine.build_packages(a["folder"], a["buckets"])
    out["packages"] = [{"bucket": b, "wall_s": round(i["seconds"], 1), "megabytes": round(i["bytes"] / 2**20, 1)}
                       for b, i in zip(a["buckets"], infos)]
else:
    out["bucket_s"] = {str(b): round(engine.warmup(b), 2) for b in a["buckets"]}
    out["ready_s"] = round(time.perf_counter() - start, 2)
    out["loaded_packages"] = sorted(engine.loaded_packages)
    b = max(a["buckets"])
    draws = defended.draws(x[:b])
    seconds, logits = timed_call(lambda: engine(x[:b], draws))
    with torch.no_grad():
        reference = defended.with_dtype(dtype)(x[:b], draws)
    out["call_s"] = round(seconds, 4)
    out["top1_agreement"] = top1_agreement(logits, reference)
    out["reference"] = "eager, same dtype, same draws"
print("RESULT " + json.dumps(out))
"""


def run_phase(phase: str, args, folder: str) -> dict:
    cache = tempfile.mkdtemp(prefix="scc-inductor-")  # every phase starts with empty Inductor caches
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
    spec = {"phase": phase, "model": args.model, "defense": args.defense, "dtype": args.dtype,
            "buckets": args.buckets, "threads": args.threads, "folder": folder,
            "packages": folder if phase == "package" else None}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"phase {phase} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(line[len("RESULT "):]), "process_s": round(wall, 2),
            "load_average_at_end": os.getloadavg()[0]}


def main() -> int:
    from scc.provenance import native_bf16

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--defense", default="ttc")
    p.add_argument("--dtype", default="bf16" if native_bf16() else "fp32", choices=("fp32", "bf16"),
                   help="default: bf16, the faster replica, on a CPU with native bf16 matmuls (avx512_bf16/amx_bf16); "
                        "fp32 elsewhere, where bf16 runs ~30x slower (default here: %(default)s)")
    p.add_argument("--buckets", default="1", help="comma-separated batch buckets, e.g. 1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--phases", default="compile,build,package")
    p.add_argument("--folder", default=None, help="package folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.buckets = [int(b) for b in args.buckets.split(",")]
    folder = args.folder or tempfile.mkdtemp(prefix="scc-packages-")
    report = {"command": " ".join(sys.argv), "load_average_at_start": os.getloadavg()[0], "phases": {}}
    try:
        for phase in args.phases.split(","):
            report["phases"][phase] = result = run_phase(phase, args, folder)
            print(phase, json.dumps(result), flush=True)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    from scc.provenance import hardware, versions

    report.update(hardware=hardware("cpu"), versions=versions())
    report["hardware"]["torch_threads"] = args.threads
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replica start-up with a cold vs a warm compile cache (`scc serve --compile-cache DIR`).

    python benchmarks/serve_compile_cache.py --model ViT-B-32 --defense ttc --max-batch 2 \
        --json benchmarks/results/serve-compile-cache-vitb32.json

Each phase is a fresh process that builds what one replica builds (scc.serve.Service: load, make_runner, compile
and run every bucket): `cold` starts from an empty DIR; `warm` reuses DIR (Inductor's on-disk caches and the
replica's torch.compiler artifact file); `new-host` starts from a fresh DIR holding only the artifact file (a
replica on another machine that was handed the one file). Reported: seconds to ready and per bucket (compile +
first call; the largest bucket is compiled inside make_runner).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time, torch
start = time.perf_counter()
from scc.serve.service import Service, service_config
cfg = service_config(json.loads(sys.argv[1]))
s = Service(cfg)
ready = time.perf_counter() - start
per = {str(b): round(t, 3) for b, t in s.bucket_seconds.items()}
top = str(max(s.buckets))
if s.runner.compile_seconds is not None:
    per[top] = round(per[top] + s.runner.compile_seconds, 3)
print("RESULT " + json.dumps({"ready_s": round(ready, 2), "bucket_s": per,
                              "artifacts_loaded": s.artifacts_loaded, "threads": torch.get_num_threads()}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="scc-tiny-digits", help="bundled model, or an open_clip name (random weights)")
    p.add_argument("--defense", default="ttc")
    p.add_argument("--backend", default="compiled")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cache = a.cache or tempfile.mkdtemp(prefix="scc-compile-cache-")
    cfg = {"model": a.model, "defense": a.defense, "backend": a.backend, "max_batch": a.max_batch,
           "compile_cache": cache, "threads": 1}
    from scc.data import DTD_CLASSES
    from scc.models import is_bundled

    if not is_bundled(a.model):  # random weights and the 47 DTD classes, as in Table 4
        cfg["labels"] = list(DTD_CLASSES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    report = {"config": cfg, "phases": {}, "load_average_before": os.getloadavg()}
    for phase in ("cold", "warm", "new-host"):
        if phase == "new-host":  # only the artifact file travels
            fresh = tempfile.mkdtemp(prefix="scc-compile-cache-")
            for name in os.listdir(cache):
                if name.startswith("scc-"):
                    shutil.copy(os.path.join(cache, name), fresh)
            cfg = {**cfg, "compile_cache": fresh}
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(line[len("RESULT "):])
        res["process_s"] = round(time.perf_counter() - start, 2)
        report["phases"][phase] = res
        print(phase, res, flush=True)
    report["load_average_after"] = os.getloadavg()
    ph = report["phases"]
    report["warm_over_cold"] = round(ph["warm"]["ready_s"] / ph["cold"]["ready_s"], 3)
    report["new_host_over_cold"] = round(ph["new-host"]["ready_s"] / ph["cold"]["ready_s"], 3)
    from scc.provenance import hardware, versions

    report["hardware"], report["versions"] = hardware("cpu"), versions()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

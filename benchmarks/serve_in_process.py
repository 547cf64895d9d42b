"""The in-process batch handler's throughput at a chosen thread count, in the configuration of
benchmarks/serve_load.py's replicas (bundled model, compiled SCC, max batch 8, a compile cache, so Inductor freezing
is off as in the replicas): the reference `scc loadtest` measures at the replicas' own thread count, here at the
machine's (2 threads on 2 cores), for the 70 % throughput target.

    python benchmarks/serve_in_process.py --threads 2 --json benchmarks/results/serve-in-process-2threads.json

Each run compiles into a fresh private cache (about 5 minutes on 2 cores), then times 1024 images in chunks of 8.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import scc
from scc.defenses import split_spec
from scc.provenance import hardware, versions
from scc.serve.loadtest import in_process, load_images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--defense", default="scc")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--json", required=True, help="where to write the result")
    a = p.parse_args()
    out = os.path.abspath(a.json)
    if not os.path.isdir(os.path.dirname(out)):
        raise SystemExit(f"--json {a.json}: its folder does not exist; create it first")
    load_before = os.getloadavg()
    clf = scc.load("scc-tiny-digits")
    name = split_spec(a.defense)[0]
    info = {"model": "scc-tiny-digits", "pretrained": None, "labels": list(clf.labels), "defense": name,
            "spec": a.defense, "backend": "compiled", "dtype": "fp32", "device": "cpu", "max_batch": 8,
            "threads": a.threads}
    start = time.perf_counter()
    ref = in_process(info, load_images("digits", limit=256), a.images, 300.0, tempfile.mkdtemp(prefix="scc-cc-"))
    result = {"command": "python " + " ".join(sys.argv), **ref, "defense": name, "spec": a.defense,
              "backend": "compiled", "max_batch": 8, "total_wall_s": round(time.perf_counter() - start, 1),
              "load_average": {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]},
              "hardware": hardware("cpu"), "versions": versions()}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"in-process, batch 8, {ref['threads']} thread(s): {ref['throughput_images_s']:.1f} images/s "
          f"(start {ref['start_s']:.0f} s) -> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

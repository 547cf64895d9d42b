"""`scc loadtest`: closed-loop load test of a running `scc serve`, beside the in-process runner (scc.serve.loadtest).

    scc loadtest --url http://127.0.0.1:8000 --images digits --concurrency 1,4,16,64 --requests 256 \\
        --json benchmarks/results/serve_load.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SccError
from .args import add_common, check_output, positive_float, positive_int, seed_int, write_json


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="closed-loop load test of a running `scc serve`", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running scc serve")
    p.add_argument("--images", default="digits", help="digits (the held-out digits as PNGs) or a folder of images")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--requests", type=positive_int, default=256, help="requests per level")
    p.add_argument("--max-seconds", type=positive_float, default=120.0, help="time bound per level")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="request seed (the server needs --client-seeds); each request's key is its index")
    p.add_argument("--replicas", type=positive_int, default=None, help="recorded in the report (the service's "
                                                                        "replicas)")
    p.add_argument("--no-in-process", dest="in_process", action="store_false", help="skip the in-process reference")
    p.add_argument("--compile-cache", default=None,
                   help="the server's --compile-cache folder: the in-process reference of a compiled service loads "
                        "its graphs from there instead of compiling every bucket again")
    p.add_argument("--png", default=None, help="latency vs throughput plot (default: the --json path with .png)")
    add_common(p, threads=False)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..serve.loadtest import loadtest, plot

    levels, bad = [], []
    for c in a.concurrency.split(","):
        try:
            levels.append(positive_int(c.strip()))
        except (argparse.ArgumentTypeError, ValueError):
            bad.append(c)
    if bad or not levels:
        raise SccError(f"--concurrency takes comma-separated positive integers, got bad value(s) {bad or [a.concurrency]}")
    check_output(a.json)
    png = a.png or (str(Path(a.json).with_suffix(".png")) if a.json and a.json != "-" else None)
    check_output(png, "--png")
    if png:
        require_extra("serve", ["matplotlib"], what="--png (the load-test plot)")
    log = (lambda line: None) if a.quiet else (lambda line: print(line, flush=True))
    report = loadtest(a.url, a.images, levels, a.requests, a.max_seconds, a.seed, a.replicas, a.in_process,
                      a.compile_cache, log=log)
    write_json(report, a.json)
    if png:
        plot(report, png)
        log(f"wrote {png}")
    return 0 if all(r["error_count"] == 0 for r in report["levels"]) else 1

"""`scc loadtest`: load test of a running `scc serve`, beside the in-process runner (scc.serve.loadtest).

    scc loadtest --url http://127.0.0.1:8000 --image-source digits --concurrency 1,4,16 --requests 256 \\
        --images-per-request 8 --transport http --json benchmarks/results/serve-load.json
    scc loadtest --duration-s 600 --rate 20 --concurrency 8 --sample-s 10 --json soak.json    # soak
    scc loadtest --wait-s 120 ...        # a server still starting: wait for GET /readyz first

A server that is not running, or not ready (within --wait-s), is one error line and exit 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SccError
from .args import (add_common, check_output, deprecated_flag, nonnegative_float, positive_float, positive_int,
                   seed_int)
from .interrupts import interruptible, write_json_to


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="load test of a running `scc serve`", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running scc serve (https:// with --tls-cert)")
    p.add_argument("--wait-s", type=nonnegative_float, default=0.0, metavar="S",
                   help="wait up to S seconds for the server to be ready (GET /readyz answers 200) before the first "
                        "level; a server not ready by then is one error line (exit 2)")
    p.add_argument("--image-source", default="digits", metavar="SOURCE",
                   help="digits (the held-out digits as PNGs) or a folder of images")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--requests", type=positive_int, default=256, help="requests per level")
    p.add_argument("--max-time-s", type=positive_float, default=120.0, metavar="S", help="time bound per level")
    p.add_argument("--images-per-request", type=positive_int, default=1,
                   help="images per request (a multipart body, or one gRPC message)")
    p.add_argument("--transport", choices=("http", "grpc"), default="http",
                   help="send over HTTP(S) or the server's gRPC ingress (--grpc)")
    p.add_argument("--grpc", default=None, help="the server's gRPC HOST:PORT (scc serve --grpc-port)")
    p.add_argument("--rate", type=positive_float, default=None,
                   help="open loop: start this many requests per second (at most --concurrency in flight)")
    p.add_argument("--duration-s", type=positive_float, default=None, metavar="S",
                   help="run each level S seconds, whatever --requests says (a soak)")
    p.add_argument("--sample-s", type=positive_float, default=None, metavar="S",
                   help="read the replicas' resident memory from /v1/info every S seconds")
    p.add_argument("--token-file", default=None, help="bearer token of a server started with --token-file")
    p.add_argument("--cacert", default=None, help="CA / self-signed certificate to verify an https:// server")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="request seed (the server needs --replay-draws); each image's key is its index")
    p.add_argument("--replicas", type=positive_int, default=None, help="recorded in the report (the service's "
                                                                        "replicas)")
    p.add_argument("--no-in-process", dest="in_process", action="store_false", help="skip the in-process reference")
    p.add_argument("--compile-cache", default=None,
                   help="the server's --compile-cache folder: the in-process reference of a compiled service loads "
                        "its graphs from there instead of compiling every bucket again")
    p.add_argument("--cache-key-file", default=None, help="the server's --cache-key-file, if any")
    p.add_argument("--png", default=None, help="latency vs throughput plot (default: the --json path with .png)")
    add_common(p, threads=False)
    for old, new in (("--images", "--image-source"), ("--max-seconds", "--max-time-s"), ("--protocol", "--transport"),
                     ("--duration", "--duration-s")):
        deprecated_flag(p, old, new)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..serve.loadtest import Target, loadtest, plot

    levels, bad = [], []
    for c in a.concurrency.split(","):
        try:
            levels.append(positive_int(c.strip()))
        except (argparse.ArgumentTypeError, ValueError):
            bad.append(c)
    if bad or not levels:
        raise SccError(f"--concurrency takes comma-separated positive integers, got bad value(s) "
                       f"{bad or [a.concurrency]}")
    check_output(a.json)
    png = a.png or (str(Path(a.json).with_suffix(".png")) if a.json and a.json != "-" else None)
    check_output(png, "--png")
    if png:
        require_extra("serve", ["matplotlib"], what="--png (the load-test plot)")
    if a.transport == "grpc":
        require_extra("serve", ["grpc"], what="--transport grpc")
        if not a.grpc:
            raise SccError("--transport grpc needs --grpc HOST:PORT (the server's --grpc-port)")
    token = None
    if a.token_file:
        from ..serve.front import load_token

        token = load_token(a.token_file)
    log = (lambda line: None) if a.quiet else (lambda line: print(line, flush=True))
    target = Target(a.url, cafile=a.cacert, token=token, grpc=a.grpc, seed=a.seed)

    def save(report: dict) -> list[str]:
        places = write_json_to(report, a.json)
        if png and report["levels"]:
            plot(report, png)
            places.append(png)
        return places

    with interruptible("levels", save, total=len(levels)) as keep:
        report = loadtest(target, a.image_source, levels, a.requests, a.max_time_s, a.replicas, a.in_process,
                          a.compile_cache, a.cache_key_file, a.images_per_request, a.transport, a.rate, a.duration_s,
                          a.sample_s, log=log, wait_s=a.wait_s, keep=keep)
    if png in save(report):
        log(f"wrote {png}")
    return 0 if all(r["error_count"] == 0 for r in report["levels"]) else 1

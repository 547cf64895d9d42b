"""Throughput and soak of a compiled `scc serve`, one service for both (what `scc loadtest` measures, driven here so
that one command reproduces the committed files).

    python benchmarks/serve_load.py --cache /tmp/scc-cc --out benchmarks/results

1. Warm the compile cache in this process (the replicas then load their graphs instead of compiling them).
2. `scc serve --backend compiled --replicas 2 --max-batch 8 --compile-cache DIR --grpc-port P` on loopback.
3. Throughput: `scc loadtest --images-per-request 8 --concurrency 1,4,16` over HTTP, then over gRPC, each followed
   in the same run by the in-process batch handler at batch 8 (the 70 % target is service / in-process at c = 16):
   serve-load-8img-http.json/.png, serve-load-8img-grpc.json/.png.
4. Soak: `scc loadtest --duration-s S --rate R --images-per-request 2 --concurrency 8 --sample-s 10`, the replicas'
   resident memory read from /v1/info every 10 s: serve-soak.json/.png.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from scc.cli.args import deprecated_flag
from scc.serve.loadtest import Target, loadtest, plot
from scc.serve.process import ServerProcess, free_port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="compile-cache folder (kept between runs)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--defense", default="scc")
    p.add_argument("--requests", type=int, default=256, help="requests per throughput level")
    p.add_argument("--soak-s", type=float, default=600.0, metavar="S", help="soak duration in seconds")
    p.add_argument("--soak-rate", type=float, default=10.0, help="requests per second during the soak")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: http, grpc, soak")
    deprecated_flag(p, "--soak-seconds", "--soak-s")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    out = Path(a.out)
    command = "python " + " ".join(sys.argv)
    t = time.perf_counter()
    from scc.serve.service import Service, service_config

    Service(service_config(defense=a.defense, backend="compiled", max_batch=8, compile_cache=a.cache, threads=1))
    print(f"compile cache warm after {time.perf_counter() - t:.0f} s", flush=True)
    grpc_port = free_port()
    log = out / "serve-load-server.log"
    server = ServerProcess(["--defense", a.defense, "--backend", "compiled", "--replicas", "2", "--max-batch", "8",
                            "--compile-cache", a.cache, "--grpc-port", str(grpc_port), "--timeout-s", "60",
                            "--threads", "1"], log, ready_timeout=1200)
    server.start()
    print(f"service ready after {server.ready_seconds:.0f} s", flush=True)
    try:
        target = Target(server.url, grpc=f"127.0.0.1:{grpc_port}")
        for transport in ("http", "grpc"):
            if transport in skip:
                continue
            report = loadtest(target, "digits", [1, 4, 16], a.requests, 120.0, replicas=2, compile_cache=a.cache,
                              images_per_request=8, transport=transport)
            report["command"] = command
            path = out / f"serve-load-8img-{transport}.json"
            path.write_text(json.dumps(report, indent=2) + "\n")
            plot(report, str(path.with_suffix(".png")))
        if "soak" not in skip:
            report = loadtest(target, "digits", [8], 10 ** 9, a.soak_s, replicas=2, with_in_process=False,
                              images_per_request=2, rate=a.soak_rate, duration_s=a.soak_s, sample_s=10)
            report["command"] = command
            path = out / "serve-soak.json"
            path.write_text(json.dumps(report, indent=2) + "\n")
            plot(report, str(path.with_suffix(".png")))
    finally:
        code = server.stop()
        print(f"server exit {code}, left running {server.left_running}", flush=True)
    os.remove(log) if code == 0 and not server.left_running else None
    return 0


if __name__ == "__main__":
    sys.exit(main())

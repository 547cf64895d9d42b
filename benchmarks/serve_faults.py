"""Faults of `scc serve`, measured: a model replica SIGKILLed under load, with 2 replicas and with the only one.

    python benchmarks/serve_faults.py --replicas 2,1 --json benchmarks/results/serve-faults.json

For each replica count R: start `scc serve` (bundled model, eager SCC, replay mode, --timeout-s T) on a free
loopback port; C client threads keep one request each in flight; after --kill-at-s seconds one model replica gets
SIGKILL; the load runs --after-s seconds more. Recorded per request: start, latency, status, Retry-After. Reported:
requests by status, failed ones (anything but 200 or a 503 with Retry-After: must be 0), the slowest request
against the deadline, and the recovery: seconds from the kill until /readyz answers 200 again, and until R model
replicas run again (a new pid in the process table and RUNNING = R in /readyz); then every answer after recovery
against the eager module with the same seed and key.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import scc
from scc.cli.args import deprecated_flag
from scc.serve.client import Client
from scc.serve.loadtest import load_images
from scc.serve.process import ServerProcess
from scc.serve.requests import decode_image

SEED = 42


def post(url, png, key, timeout):
    c = Client(url, timeout=timeout + 10)
    try:
        return c.request("POST", f"/v1/classify?seed={SEED}&key={key}&top_k=10", png, {"Content-Type": "image/png"},
                         with_headers=True)
    finally:
        c.close()


def one_run(replicas: int, a, images, reference) -> dict:
    log = Path(tempfile.mkdtemp(prefix="scc-faults-")) / "serve.log"
    server = ServerProcess(["--defense", "scc", "--backend", "eager", "--replicas", str(replicas), "--replay-draws",
                            "--max-batch", "8", "--timeout-s", str(a.timeout_s), "--threads", "1"], log)
    server.start()
    report = {"replicas": replicas, "ready_s": round(server.ready_seconds, 1)}
    try:
        pids = server.model_pids()
        assert len(pids) == replicas, pids
        records, stop, t0 = [], threading.Event(), time.perf_counter()

        def load(t):
            i = 0
            while not stop.is_set():
                key = 100_000 * t + i
                start = time.perf_counter()
                try:
                    status, raw, headers = post(server.url, images[key % len(images)][1], key, a.timeout_s)
                except OSError as err:
                    status, raw, headers = type(err).__name__, b"{}", {}
                records.append({"t": round(start - t0, 3), "latency_s": round(time.perf_counter() - start, 3),
                                "status": status, "retry_after": {k.lower(): v for k, v in headers.items()}.get(
                                    "retry-after"), "key": key, "body": raw.decode(errors="replace")})
                i += 1

        threads = [threading.Thread(target=load, args=(t,), daemon=True) for t in range(a.concurrency)]
        for t in threads:
            t.start()
        probes = []

        def probe():
            c = Client(server.url, timeout=5)
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    status, raw = c.request("GET", "/readyz")
                    running = (json.loads(raw).get("replicas") or {}).get("RUNNING")
                except (OSError, ValueError):
                    status, running = "error", None
                probes.append((round(start - t0, 3), status, running, len(server.model_pids())))
                time.sleep(0.2)
            c.close()

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        time.sleep(a.kill_at_s)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.perf_counter() - t0
        recovered = None
        while time.perf_counter() - t0 < t_kill + a.after_s or recovered is None:
            now = server.model_pids()
            if recovered is None and len(now) == replicas and victim not in now and probes and \
                    probes[-1][1] == 200 and probes[-1][2] == replicas:
                recovered = time.perf_counter() - t0
            if time.perf_counter() - t0 > t_kill + 300:
                break
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(a.timeout_s + 20)
        prober.join(10)
        after = [p for p in probes if p[0] > t_kill]
        not_ready = [p for p in after if p[1] != 200]
        back = next((p[0] for p in after if p[1] == 200 and (not_ready and p[0] > not_ready[-1][0] or not not_ready)),
                    None)
        statuses: dict[str, int] = {}
        for r in records:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        failed = [r for r in records if not (r["status"] == 200 or (r["status"] == 503 and r["retry_after"]))]
        wrong = 0
        checked = 0
        labels = reference.classifier.labels
        for r in records:
            if r["status"] == 200 and recovered is not None and r["t"] > recovered:
                res = json.loads(r["body"])["results"][0]
                png = images[r["key"] % len(images)][1]
                with torch.no_grad():
                    x = decode_image(png, reference.classifier.preprocess, 10 ** 6)
                    ref = reference(x[None], keys=[r["key"]]).softmax(-1)[0]
                got = torch.tensor([res["scores"][lab] for lab in labels])
                checked += 1
                wrong += int(res["index"] != int(ref.argmax()) or not torch.allclose(got, ref, atol=1e-4))
        around = [r for r in records if t_kill - 0.5 <= r["t"] <= t_kill + 0.5]
        report.update({
            "concurrency": a.concurrency, "timeout_s": a.timeout_s, "killed_pid": victim,
            "kill_at_s": round(t_kill, 2), "requests": len(records), "by_status": statuses,
            "failed_requests": len(failed), "failed_examples": [{k: r[k] for k in ("t", "status", "body")}
                                                                for r in failed[:5]],
            "retryable_503": sum(1 for r in records if r["status"] == 503 and r["retry_after"]),
            "requests_in_flight_at_kill": len(around),
            "slowest_request_s": max(r["latency_s"] for r in records),
            "readyz_not_200_after_kill": len(not_ready),
            "readyz_200_again_after_s": None if back is None or not not_ready else round(back - t_kill, 2),
            "replicas_back_after_s": None if recovered is None else round(recovered - t_kill, 2),
            "answers_after_recovery_checked": checked, "answers_after_recovery_wrong": wrong,
        })
    finally:
        code = server.stop()
        report.update({"exit_code": code, "left_running": server.left_running})
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="2,1")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--kill-at-s", type=float, default=4.0, metavar="S", help="seconds of load before the kill")
    p.add_argument("--after-s", type=float, default=20.0, metavar="S",
                   help="seconds of load after the kill (at least)")
    deprecated_flag(p, "--kill-at", "--kill-at-s")
    deprecated_flag(p, "--after", "--after-s")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    images = load_images("digits", 64)
    reference = scc.defend(scc.load("scc-tiny-digits"), "scc", seed=SEED)
    from scc.provenance import hardware, versions

    report = {"command": "python " + " ".join(sys.argv), "load_average_before": os.getloadavg(), "runs": []}
    for r in (int(v) for v in a.replicas.split(",")):
        run = one_run(r, a, images, reference)
        print(json.dumps({k: v for k, v in run.items() if k != "failed_examples"}), flush=True)
        report["runs"].append(run)
    report["load_average_after"] = os.getloadavg()
    report["hardware"], report["versions"] = hardware("cpu"), versions()
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["failed_requests"] == 0 and r["answers_after_recovery_wrong"] == 0 for r in report["runs"]) \
        else 1


if __name__ == "__main__":
    sys.exit(main())

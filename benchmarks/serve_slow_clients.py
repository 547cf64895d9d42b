"""Slow clients against `scc serve`: do 200 trickling clients starve 8 well-behaved ones?

    python benchmarks/serve_slow_clients.py --json benchmarks/results/serve-slow-clients.json

One local service (bundled model, eager SCC, 1 model replica, the default limits: 64 requests admitted, header and
body deadlines 10 s, 32 requests per client address) on 127.0.0.1. Eight well-behaved clients, each on its own
loopback address (127.0.1.x), send one PNG per request in a closed loop for --duration-s seconds, three times:
  alone;
  beside 200 trickling clients on 200 other loopback addresses (127.0.2.x): half send their request headers one byte
    a second, half send whole headers (Content-Length 65536) and then their body one byte a second; each comes back
    a second after the server answers or closes it (the per-address cap cannot help here: every trickler has its
    own address);
  beside the same 200 tricklers all on one address (127.0.0.2): the per-address cap is what holds them.
For each phase: the well-behaved clients' requests, error rate (anything but 200) and latency percentiles, and what
the tricklers met (connections, the answers they got: 408 from the header or body deadline, 429 from the cap).
Everything is bounded: the client counts, the phase length, a per-request timeout; the service is stopped at the end.
"""
import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from scc.serve.client import Client
from scc.serve.process import ServerProcess

TRICKLE_INTERVAL_S = 1.0


def png(seed: int) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def well_behaved(url: str, clients: int, seconds: float, timeout_s: float) -> dict:
    """`clients` closed-loop clients, each on its own loopback address, for `seconds`."""
    records: list[tuple[int, float]] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def run(i: int):
        c = Client(url, timeout=timeout_s, source=f"127.0.1.{i + 1}")
        body = png(i)
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    status = c.request("POST", "/v1/classify?top_k=3", body, {"Content-Type": "image/png"})[0]
                except OSError:
                    status = 0  # no answer at all (reset, timeout)
                with lock:
                    records.append((status, time.perf_counter() - t))
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout_s + 10)
    ok = [s for s, _ in records if s == 200]
    lat = [dt * 1e3 for _, dt in records]
    statuses: dict[str, int] = {}
    for s, _ in records:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"requests": len(records), "ok": len(ok), "error_rate": round(1 - len(ok) / len(records), 4) if records
            else None, "statuses": statuses, "throughput_rps": round(len(ok) / seconds, 2),
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p95_ms": round(percentile(lat, 95), 1) if lat else None,
            "p99_ms": round(percentile(lat, 99), 1) if lat else None,
            "max_ms": round(max(lat), 1) if lat else None}


async def trickler(port: int, source: str, kind: str, stop: asyncio.Event, stats: dict) -> None:
    """One client that sends its request one byte a second, and reconnects whenever the server closes it."""
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 65536\r\n\r\n")
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(TRICKLE_INTERVAL_S)
            continue
        stats["connections"] += 1
        pending = head if kind == "headers" else b"\0" * 65536
        if kind == "body":
            writer.write(head)
        answer = b""
        try:
            while not stop.is_set() and pending:
                writer.write(pending[:1])
                pending = pending[1:]
                await writer.drain()
                try:
                    got = await asyncio.wait_for(reader.read(4096), TRICKLE_INTERVAL_S)
                except asyncio.TimeoutError:
                    continue
                if not got:
                    break
                answer += got
        except OSError:
            pass
        finally:
            writer.close()
        if answer.startswith(b"HTTP/1.1 "):
            status = answer[9:12].decode(errors="replace")
        else:
            status = "stopped by the benchmark" if stop.is_set() else "closed without an answer"
        stats["answers"][status] = stats["answers"].get(status, 0) + 1
        if not stop.is_set():  # a slow client: it comes back a second later
            await asyncio.sleep(TRICKLE_INTERVAL_S)


class Trickle:
    """`count` tricklers (half slow headers, half slow bodies) on an event loop in a thread of their own."""

    def __init__(self, port: int, count: int, addresses: list[str]):
        self.port, self.count, self.addresses = port, count, addresses
        self.stats = {"clients": count, "addresses": len(set(addresses)), "connections": 0, "connect_errors": 0,
                      "answers": {}}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stop_event: asyncio.Event | None = None
        self.tasks = None

    def start(self) -> "Trickle":
        self.thread.start()

        async def begin():
            self.stop_event = asyncio.Event()
            self.tasks = [asyncio.ensure_future(trickler(self.port, self.addresses[i % len(self.addresses)],
                                                         "headers" if i % 2 else "body", self.stop_event,
                                                         self.stats)) for i in range(self.count)]

        asyncio.run_coroutine_threadsafe(begin(), self.loop).result(30)
        return self

    def stop(self) -> dict:
        async def end():
            self.stop_event.set()
            await asyncio.wait(self.tasks, timeout=2 * TRICKLE_INTERVAL_S + 5)
            for t in self.tasks:
                t.cancel()

        asyncio.run_coroutine_threadsafe(end(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        return self.stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds of well-behaved load per phase")
    p.add_argument("--clients", type=int, default=8, help="well-behaved clients")
    p.add_argument("--tricklers", type=int, default=200, help="trickling clients")
    p.add_argument("--settle-s", type=float, default=3.0, help="seconds the tricklers run before the measurement")
    a = p.parse_args()
    if a.clients > 250 or a.tricklers > 250 or a.duration_s > 600:
        p.error("at most 250 clients of each kind and 600 s per phase")
    from scc.provenance import hardware, versions

    folder = Path(tempfile.mkdtemp(prefix="scc-slow-clients-"))
    args = ["--defense", "scc", "--backend", "eager", "--replicas", "1", "--threads", "1"]
    server = ServerProcess(args, folder / "serve.log")
    server.start()
    phases = []
    try:
        for name, addresses in (("alone", None),
                                ("beside N tricklers on N addresses", [f"127.0.2.{i + 1}" for i in range(a.tricklers)]),
                                ("beside N tricklers on one address", ["127.0.0.2"])):
            name = name.replace("N", str(a.tricklers))
            trickle = Trickle(server.port, a.tricklers, addresses).start() if addresses else None
            if trickle:
                time.sleep(a.settle_s)
            good = well_behaved(server.url, a.clients, a.duration_s, timeout_s=60)
            bad = trickle.stop() if trickle else {}
            answers = bad.get("answers", {})
            phases.append({"phase": name, "requests": good["requests"], "error_rate": good["error_rate"],
                           "p50_ms": good["p50_ms"], "p99_ms": good["p99_ms"], "max_ms": good["max_ms"],
                           "throughput_rps": good["throughput_rps"], "tricklers": bad.get("clients", 0),
                           "trickler_addresses": bad.get("addresses", 0),
                           "trickler_connections": bad.get("connections", 0), "trickler_408": answers.get("408", 0),
                           "trickler_429": answers.get("429", 0), "p95_ms": good["p95_ms"],
                           "statuses": good["statuses"], "trickler_answers": answers})
            print(json.dumps(phases[-1]), flush=True)
            time.sleep(2)
    finally:
        server.stop()
    report = {"command": "python " + " ".join(sys.argv), "server_args": " ".join(args),
              "duration_s": a.duration_s, "clients": a.clients, "tricklers": a.tricklers,
              "trickle_interval_s": TRICKLE_INTERVAL_S, "settle_s": a.settle_s, "threads": 1,
              "limits": "defaults: --max-queue 64, --header-timeout-s 10, --body-timeout-s 10, "
                        "--max-client-requests 32",
              "left_running": len(server.left_running), "by_phase": phases, "load_average_after": os.getloadavg(),
              "hardware": hardware("cpu"), "versions": versions()}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

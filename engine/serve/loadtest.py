"""`scc loadtest`: load test of a running `scc serve`, beside the in-process runner.

    scc loadtest --url http://127.0.0.1:8000 --image-source digits --concurrency 1,4,16 --requests 256 \
        --images-per-request 8 --transport http|grpc --json benchmarks/results/serve-load.json
    scc loadtest --duration-s 600 --rate 20 --concurrency 8 --json soak.json     # soak: steady rate, memory sampled

Closed loop (default): per concurrency level C, C threads each keep one request in flight (N images per request,
keep-alive connections) until --requests requests or --max-time-s. Open loop (--rate R): requests start R times a
second on schedule, at most C in flight (a late request starts as soon as a thread is free). --duration-s S runs one
level for S seconds whatever --requests says. Reported per level: throughput (images/s), latency p50/p95/p99 (ms,
client side, per request), the mean engine batch the service formed (from each answer's `batch_size`: a batch of b
images answers b images, so batches = sum(1/b)), errors by status, 503s with Retry-After. With --sample-s T the
replicas' resident memory is read from GET /v1/info every T seconds (each answer comes from one model replica and
the ingress), with its slope per replica (MB/hour, least squares, first 10 % of the run left out as warm-up).
Then the same images through the in-process batch handler (scc.serve.service.Service, the configuration GET
/v1/info reports) in chunks of the service's max batch: `overhead_ratio` = service throughput / in-process
throughput at each level (and / R per replica with --replicas R). A PNG plots latency against throughput, or
memory against time for a soak. Record the load: on a shared machine only ratios measured in one run mean anything.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..images import IMAGE_SUFFIXES
from ..errors import SccError
from ..timing import percentile
from .client import Client, GrpcClient, get_json, multipart, wait_ready


@dataclass(frozen=True)
class Target:
    """Where and how to send: the HTTP(S) URL (for /v1/info and HTTP requests), TLS CA, bearer token, gRPC target
    (host:port, with transport grpc), replay seed."""
    url: str
    cafile: str | None = None
    token: str | None = None
    grpc: str | None = None
    seed: int | None = None


def load_images(source: str, limit: int = 256) -> list[tuple[str, bytes]]:
    """[(name, encoded bytes)]: `digits` = the held-out digits as PNGs, else every image file of a folder."""
    if source == "digits":
        import numpy as np
        from PIL import Image

        from ..data import load_dataset

        ds = load_dataset("digits", 32, limit=limit)
        out = []
        for i, x in enumerate(ds.images):
            arr = (x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out.append((f"digit{i}.png", buf.getvalue()))
        return out
    folder = Path(source)
    if not folder.is_dir():
        raise SccError(f"--image-source: {source} is neither 'digits' nor a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise SccError(f"--image-source: no image files under {folder}")
    return [(p.name, p.read_bytes()) for p in files]


class Sender:
    """One thread's connection: send(first image index, n images) -> (status, result dicts, retry_after)."""

    def __init__(self, target: Target, images: list[tuple[str, bytes]], transport: str, timeout: float):
        self.target, self.images, self.transport = target, images, transport
        if transport == "grpc":
            self.client = GrpcClient(target.grpc, token=target.token, timeout=timeout, cafile=target.cafile)
        else:
            self.client = Client(target.url, timeout, cafile=target.cafile, token=target.token)

    def send(self, i: int, n: int):
        picked = [self.images[(i + j) % len(self.images)] for j in range(n)]
        keys = [str(i + j) for j in range(n)]
        seed = self.target.seed
        if self.transport == "grpc":
            code, body, trailing = self.client.classify([(name, data, k) for (name, data), k in zip(picked, keys)],
                                                        seed="" if seed is None else str(seed))
            status = 200 if code == "OK" else {"UNAVAILABLE": 503, "UNAUTHENTICATED": 401}.get(code, 400)
            return status, body["results"] if status == 200 else [], trailing.get("retry-after")
        query = f"?key={','.join(keys)}" + (f"&seed={seed}" if seed is not None else "")
        if n == 1:
            name, data = picked[0]
            ctype = "image/png" if name.endswith(".png") else "application/octet-stream"
            body = data
        else:
            ctype, body = multipart([("image", name, data) for name, data in picked])
        status, raw, headers = self.client.request("POST", "/v1/classify" + query, body, {"Content-Type": ctype},
                                                   with_headers=True)
        retry = {k.lower(): v for k, v in headers.items()}.get("retry-after")
        return status, json.loads(raw)["results"] if status == 200 else [], retry

    def close(self):
        self.client.close()


def run_level(target: Target, images: list[tuple[str, bytes]], concurrency: int, requests: int, max_time_s: float,
              images_per_request: int = 1, transport: str = "http", rate: float | None = None,
              timeout: float = 60.0, samples: list | None = None) -> dict:
    """One level: `concurrency` threads, `requests` requests of `images_per_request` images (or max_time_s);
    closed loop, or open loop at `rate` requests/s. Each request is appended to `samples` as
    (start s from the level's start, latency s, status, images answered, batch sizes, Retry-After)."""
    lock = threading.Lock()
    counter = [0]
    samples = [] if samples is None else samples
    errors: dict[str, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + max_time_s

    stop = threading.Event()  # set when the level ends, however it ends (an interrupt included)

    def worker():
        sender = Sender(target, images, transport, timeout)
        try:
            while True:
                with lock:
                    i = counter[0]
                    if i >= requests or time.perf_counter() > deadline or stop.is_set():
                        return
                    counter[0] += 1
                if rate:
                    wait = t0 + i / rate - time.perf_counter()
                    if wait > 0 and stop.wait(wait):
                        return
                start = time.perf_counter()
                try:
                    status, results, retry = sender.send(i * images_per_request, images_per_request)
                except (OSError, http.client.HTTPException, ValueError) as err:
                    with lock:
                        errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                latency = time.perf_counter() - start
                good = [r for r in results if "error" not in r]
                if status == 200 and len(good) < len(results):
                    status = 0  # an image of the answer carries an error
                with lock:
                    samples.append((round(start - t0, 4), latency, status, len(good),
                                    [r.get("batch_size") for r in good], retry))
                    if status != 200:
                        errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            sender.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(max_time_s + timeout + 5)
    finally:
        stop.set()
    wall = time.perf_counter() - t0
    ok = [s for s in samples if s[2] == 200]
    lat = [s[1] * 1e3 for s in ok]
    batches = [b for s in ok for b in s[4] if b]
    answered = sum(s[3] for s in ok)
    return {"concurrency": concurrency, "images_per_request": images_per_request, "transport": transport,
            "rate": rate, "requests": len(samples) + sum(v for k, v in errors.items() if not k.isdigit()),
            "ok": len(ok), "errors": errors, "error_count": sum(errors.values()),
            "retryable_503": sum(1 for s in samples if s[2] == 503 and s[5] is not None),
            "wall_s": round(wall, 3), "images": answered,
            "throughput_images_s": round(answered / wall, 3) if wall > 0 else None,
            "latency_ms": {q: round(percentile(lat, p), 2) for q, p in (("p50", .5), ("p95", .95), ("p99", .99))}
            if lat else None,
            "mean_batch_size": round(len(batches) / sum(1 / b for b in batches), 3) if batches else None,
            "stopped_by_time": len(samples) < requests}


def sample_memory(target: Target, seconds: float, every: float, out: list, stop: threading.Event) -> None:
    """Every `every` s until `stop` or `seconds`: (t, model replica id, its RSS MB, ingress id, its RSS MB); an id
    is the process's random id in /v1/info."""
    t0 = time.perf_counter()
    while not stop.is_set() and time.perf_counter() - t0 < seconds:
        try:
            info = get_json(target.url, "/v1/info", cafile=target.cafile, token=target.token)
            replica, ingress = info["replica"], info["ingress"]
            out.append((round(time.perf_counter() - t0, 2), replica["id"], replica["rss_mb"], ingress["id"],
                        ingress["rss_mb"]))
        except (SccError, OSError, KeyError, ValueError):
            pass
        stop.wait(every)


def memory_report(rows: list) -> dict:
    """Per process (model replicas by id, the ingress): samples, first/last/max RSS and its slope in MB/hour over
    the run after its first 10 % (imports and first batches)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for t, rid, rss, iid, irss in rows:
        series.setdefault(f"model:{rid}", []).append((t, rss))
        series.setdefault(f"ingress:{iid}", []).append((t, irss))
    out = {}
    for name, pts in series.items():
        pts = [(t, m) for t, m in pts if m is not None]
        if not pts:
            continue
        end = pts[-1][0]
        fit = [(t, m) for t, m in pts if t >= 0.1 * end] or pts
        n = len(fit)
        mt, mm = sum(t for t, _ in fit) / n, sum(m for _, m in fit) / n
        var = sum((t - mt) ** 2 for t, _ in fit)
        slope = sum((t - mt) * (m - mm) for t, m in fit) / var * 3600 if var > 0 else None
        out[name] = {"samples": len(pts), "first_mb": pts[0][1], "last_mb": pts[-1][1],
                     "max_mb": max(m for _, m in pts), "slope_mb_per_hour": None if slope is None else round(slope, 2),
                     "series": [[t, m] for t, m in pts]}
    return out


def in_process(info: dict, images: list[tuple[str, bytes]], requests: int, max_time_s: float,
               compile_cache: str | None = None, cache_key_file: str | None = None) -> dict:
    """The same images through scc.serve.service.Service in this process (the service's configuration and threads), in
    chunks of its max batch: images/s of the batch handler alone (no HTTP, no Ray, no decoding)."""
    import torch

    from .requests import Item, decode_image
    from .service import Service, service_config

    threads = int(info.get("threads") or 1)
    cfg = service_config(model=info["model"], pretrained=info.get("pretrained"), labels=info["labels"],
                         defense=info.get("spec", info["defense"]), backend=info["backend"], dtype=info["dtype"],
                         device=info.get("device", "cpu"), max_batch=info["max_batch"], threads=threads,
                         compile_cache=compile_cache, cache_key_file=cache_key_file)
    start = time.perf_counter()
    service = Service(cfg)
    start_s = time.perf_counter() - start
    bs = service.max_batch
    xs = [decode_image(data, service.classifier.preprocess, service.limits.max_pixels, name) for name, data in images]
    done, seconds = 0, 0.0
    deadline = time.perf_counter() + max_time_s
    while done < requests and time.perf_counter() < deadline:
        n = min(bs, requests - done)
        items = [Item(name="x", x=xs[(done + j) % len(xs)], seed=0, key=done + j) for j in range(n)]
        t0 = time.perf_counter()
        service.handle_batch(items)
        seconds += time.perf_counter() - t0
        done += n
    return {"batch_size": bs, "threads": torch.get_num_threads(), "images": done, "wall_s": round(seconds, 3),
            "throughput_images_s": round(done / seconds, 3), "start_s": round(start_s, 2)}


def plot_title(report: dict) -> str:
    """What ran: model, defense spec, backend, the replicas when --replicas recorded them, images per request,
    transport."""
    s, replicas, level = report["service"], report.get("replicas"), report["levels"][0]
    return (f"scc serve: {s['model']} {s['spec']} {s['backend']}" + (f" x{replicas} replicas" if replicas else "")
            + f", {level['images_per_request']} image(s)/request, {level['transport']}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    title = plot_title(report)
    if report.get("memory"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, m in sorted(report["memory"].items()):
            ts, ms = zip(*m["series"])
            ax.plot(ts, ms, ".-", ms=3, label=f"{name} ({m['slope_mb_per_hour']} MB/h)")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("resident memory (MB)")
        ax.set_title(title + f"\nsoak at {report['levels'][0]['rate']} requests/s", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    rows = [r for r in report["levels"] if r["latency_ms"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        ax.plot([r["throughput_images_s"] for r in rows], [r["latency_ms"][q] for r in rows], style, label=q)
    for r in rows:
        ax.annotate(f"c={r['concurrency']}", (r["throughput_images_s"], r["latency_ms"]["p50"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)
    ref = report.get("in_process")
    if ref:
        ax.axvline(ref["throughput_images_s"], color="gray", lw=1,
                   label=f"in-process runner, batch {ref['batch_size']}")
        ax.axvline(0.7 * ref["throughput_images_s"], color="gray", lw=1, ls=":", label="70 % of it")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency per request (ms, client side)")
    if rows:
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 60, not 6 x 10^1
            axis(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    else:  # every request failed: the report's errors say why
        ax.text(0.5, 0.5, "no successful request: see the report's errors", transform=ax.transAxes, ha="center")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_ready(target: Target, wait_s: float = 0.0) -> None:
    """Return once the service at `target` answers GET /readyz with 200 (polled for up to `wait_s` seconds), else
    one SccError line: nothing listens there, or it is not ready, and what to do."""
    try:
        wait_ready(target.url, timeout=wait_s, cafile=target.cafile, verify=True)
        return
    except SccError:
        problem = why_not_ready(target)
    if problem is None:  # it became ready just now
        return
    waited = f" after waiting {wait_s:g} s" if wait_s else ""
    hint = "wait longer with a larger --wait-s" if wait_s else "give --wait-s SECONDS to wait for it"
    if "refused" in problem:
        hint = "start it with `scc serve`, or " + hint
    raise SccError(f"no ready scc serve at {target.url}{waited}: {problem}; {hint}")


def why_not_ready(target: Target) -> str | None:
    """One probe of GET /readyz: None when ready, else what is wrong, in a few words."""
    client = Client(target.url, timeout=5, cafile=target.cafile, token=target.token)
    try:
        status, body = client.request("GET", "/readyz")
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except (OSError, http.client.HTTPException) as err:
        return f"it does not answer ({type(err).__name__}: {err})"
    finally:
        client.close()
    if status == 200:
        return None
    if status == 503:
        return "it answers but is not ready yet (GET /readyz: HTTP 503)"
    return f"GET /readyz answered HTTP {status} (is it an scc serve?)"


# keyword arguments of `loadtest` under their names of the previous release, kept for one release
_OLD_KEYWORDS = {"images": "image_source", "max_seconds": "max_time_s", "protocol": "transport",
                 "duration": "duration_s"}


def loadtest(target: Target, image_source: str = "digits", levels: list[int] = (1, 4, 16, 64), requests: int = 256,
             max_time_s: float = 120.0, replicas: int | None = None, with_in_process: bool = True,
             compile_cache: str | None = None, cache_key_file: str | None = None, images_per_request: int = 1,
             transport: str = "http", rate: float | None = None, duration_s: float | None = None,
             sample_s: float | None = None, log=print, wait_s: float = 0.0,
             keep: Callable[[Callable[[], tuple]], None] | None = None, **old) -> dict:
    """Every level against the service at `target` (ready within `wait_s` seconds, else one SccError line), then
    the in-process reference; the JSON report. `image_source`: `digits` or a folder of images; `transport`: http
    or grpc; `max_time_s`: the time bound per level; `duration_s`: run each level that long (a soak).
    `keep(snapshot)` is called once before the levels: snapshot() -> (report of the levels finished so far, their
    number, the levels asked for, the missing ones), what a run cut short writes (scc.cli.interrupts).
    The keywords images, max_seconds, protocol and duration are deprecated spellings of the four above."""
    from ..provenance import hardware, versions

    for key, value in old.items():
        if key not in _OLD_KEYWORDS:
            raise TypeError(f"loadtest() got an unexpected keyword argument {key!r}")
        warnings.warn(f"loadtest({key}=...) is deprecated; use {_OLD_KEYWORDS[key]}=", DeprecationWarning,
                      stacklevel=2)
    image_source = old.get("images", image_source)
    max_time_s = old.get("max_seconds", max_time_s)
    transport = old.get("protocol", transport)
    duration_s = old.get("duration", duration_s)
    check_ready(target, wait_s)
    try:
        info = get_json(target.url, "/v1/info", cafile=target.cafile, token=target.token)
    except (OSError, http.client.HTTPException) as err:
        raise SccError(f"GET {target.url}/v1/info failed ({type(err).__name__}: {err}); is the server still "
                       "running?") from None
    images = load_images(image_source, limit=max(min(requests, 1024), images_per_request))
    if target.seed is not None and info.get("draws") != "replay":
        raise SccError(f"{target.url} refuses client-chosen seeds: drop --seed, or restart it with --replay-draws")
    if images_per_request > info.get("limits", {}).get("max_images", images_per_request):
        raise SccError(f"--images-per-request {images_per_request} exceeds the server's max_images "
                       f"{info['limits']['max_images']}")
    if transport == "grpc" and not target.grpc:
        raise SccError("--transport grpc needs --grpc HOST:PORT (the server's --grpc-port)")
    if duration_s:
        requests, max_time_s = 10 ** 9, duration_s
    load_before = os.getloadavg()
    service = {k: info.get(k) for k in ("model", "defense", "spec", "backend", "dtype", "max_batch", "batch_wait_ms",
                                        "threads", "buckets", "device", "draws")}
    service["spec"] = service["spec"] or info.get("defense")  # a server of the previous release: its spec
    report = {"url": target.url, "service": service, "replicas": replicas, "image_source": image_source,
              "requests_per_level": None if duration_s else requests, "duration_s": duration_s, "levels": []}
    memory_rows: list = []

    def finished() -> dict:
        """The report with what is known at its end: memory, load, the client and server versions."""
        done = dict(report)
        if memory_rows:
            done["memory"] = memory_report(memory_rows)
        done["load_average"] = {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]}
        done["client"] = {"hardware": hardware("cpu"), "versions": versions(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        done["server_versions"] = info.get("versions")
        return done

    if keep is not None:
        keep(lambda: (finished(), len(report["levels"]), len(levels),
                      [f"concurrency {c}" for c in levels[len(report["levels"]):]]
                      + (["the in-process reference"] if with_in_process else [])))
    run_level(target, images, 1, min(4, requests), 30, images_per_request, transport)  # connections, not reported
    stop = threading.Event()
    sampler = None
    if sample_s:
        sampler = threading.Thread(target=sample_memory, args=(target, max_time_s * len(levels) + 60, sample_s,
                                                               memory_rows, stop), daemon=True)
        sampler.start()
    try:
        for c in levels:
            row = run_level(target, images, c, requests, max_time_s, images_per_request, transport, rate)
            report["levels"].append(row)
            lat = row["latency_ms"] or {}
            log(f"c={c:3d}  {row['throughput_images_s'] or 0:8.1f} img/s  p50 {lat.get('p50', float('nan')):8.1f} ms"
                f"  p95 {lat.get('p95', float('nan')):8.1f}  p99 {lat.get('p99', float('nan')):8.1f}  "
                f"batch {row['mean_batch_size']}  errors {row['error_count']}")
    finally:
        stop.set()
        if sampler is not None:
            sampler.join(30)
    if memory_rows:
        log("memory slope (MB/hour): " + ", ".join(f"{k} {v['slope_mb_per_hour']}"
                                                   for k, v in sorted(memory_report(memory_rows).items())))
    if with_in_process:
        ref = in_process(info, images, min(requests, 1024), min(max_time_s, 120), compile_cache, cache_key_file)
        report["in_process"] = ref
        for row in report["levels"]:
            row["overhead_ratio"] = round(row["throughput_images_s"] / ref["throughput_images_s"], 3) \
                if row["throughput_images_s"] else None
            if replicas and row["throughput_images_s"]:  # per replica: each replica runs one such runner
                row["overhead_ratio_per_replica"] = round(row["overhead_ratio"] / replicas, 3)
        log(f"in-process batch handler, batch {ref['batch_size']}, {ref['threads']} thread(s): "
            f"{ref['throughput_images_s']:.1f} img/s; service/in-process: "
            + ", ".join(f"c={r['concurrency']} {r['overhead_ratio']}" for r in report["levels"]))
    return finished()

"""`scc loadtest`: closed-loop load test of a running `scc serve`, beside the in-process runner.

    scc loadtest --url http://127.0.0.1:8000 --images digits --concurrency 1,4,16,64 --requests 256 \
        --json benchmarks/results/serve_load.json

Per concurrency level C, C threads each keep one request in flight (one image per POST /v1/classify, keep-alive
connections) until --requests answers or --max-seconds. Reported per level: throughput (images/s), latency
p50/p95/p99 (ms, client side), the mean engine batch the service formed (from each answer's `batch_size`: a batch
of b images answers b images, so batches = sum(1/b)), errors by status. Then the same images through the
in-process batch handler (scc.serve.service.Service, the configuration GET /v1/info reports: model, defense, backend,
dtype, threads) in chunks of the service's max batch: `overhead_ratio` = service throughput / in-process
throughput at each level, and with --replicas R also `overhead_ratio_per_replica` = that / R (each replica owns
one such runner). A PNG plots latency against throughput. Record the load: on a shared machine only ratios
measured in one run mean anything.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
from pathlib import Path

from ..data import IMAGE_SUFFIXES
from ..errors import SccError
from ..timing import percentile
from .client import Client, get_json


def load_images(spec: str, limit: int = 256) -> list[tuple[str, bytes]]:
    """[(name, encoded bytes)]: `digits` = the held-out digits as PNGs, else every image file of a folder."""
    if spec == "digits":
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
    folder = Path(spec)
    if not folder.is_dir():
        raise SccError(f"--images: {spec} is neither 'digits' nor a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise SccError(f"--images: no image files under {folder}")
    return [(p.name, p.read_bytes()) for p in files]


def run_level(url: str, images: list[tuple[str, bytes]], concurrency: int, requests: int, max_seconds: float,
              seed: int | None = None, timeout: float = 60.0) -> dict:
    """One closed-loop level: `concurrency` threads, `requests` single-image requests in all (or max_seconds)."""
    lock = threading.Lock()
    counter = [0]
    samples: list[tuple[float, int, int | None]] = []  # (latency s, status, batch size)
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + max_seconds

    def worker():
        client = Client(url, timeout)
        try:
            while True:
                with lock:
                    i = counter[0]
                    if i >= requests or time.perf_counter() > deadline:
                        return
                    counter[0] += 1
                name, data = images[i % len(images)]
                query = f"?key={i}" + (f"&seed={seed}" if seed is not None else "")
                start = time.perf_counter()
                try:
                    status, body = client.request("POST", "/v1/classify" + query, data,
                                                  {"Content-Type": "image/png" if name.endswith(".png")
                                                   else "application/octet-stream"})
                except (OSError, http.client.HTTPException) as err:
                    with lock:
                        errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                latency = time.perf_counter() - start
                batch = None
                if status == 200:
                    res = json.loads(body)["results"][0]
                    batch = res.get("batch_size")
                    if "error" in res:
                        status = 0
                with lock:
                    samples.append((latency, status, batch))
                    if status != 200:
                        errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + timeout + 5)
    wall = time.perf_counter() - start
    ok = [s for s in samples if s[1] == 200]
    lat = [s[0] * 1e3 for s in ok]
    batches = [s[2] for s in ok if s[2]]
    return {"concurrency": concurrency, "requests": len(samples) + sum(v for k, v in errors.items()
                                                                        if not k.isdigit()),
            "ok": len(ok), "errors": errors, "error_count": sum(errors.values()), "seconds": round(wall, 3),
            "throughput_images_s": round(len(ok) / wall, 3) if wall > 0 else None,
            "latency_ms": {q: round(percentile(lat, p), 2) for q, p in (("p50", .5), ("p95", .95), ("p99", .99))}
            if lat else None,
            "mean_batch_size": round(len(batches) / sum(1 / b for b in batches), 3) if batches else None,
            "stopped_by_time": len(samples) < requests}


def in_process(info: dict, images: list[tuple[str, bytes]], requests: int, max_seconds: float,
               compile_cache: str | None = None) -> dict:
    """The same images through scc.serve.service.Service in this process (the service's configuration and threads), in
    chunks of its max batch: images/s of the batch handler alone (no HTTP, no Ray, no decoding)."""
    import torch

    from .requests import Item, decode_image
    from .service import Service, service_config

    threads = int(info.get("threads") or 1)
    cfg = service_config(model=info["model"], pretrained=info.get("pretrained"), labels=info["labels"],
                         defense=info["defense"], backend=info["backend"], dtype=info["dtype"],
                         device=info.get("device", "cpu"), max_batch=info["max_batch"], threads=threads,
                         compile_cache=compile_cache)
    start = time.perf_counter()
    service = Service(cfg)
    start_s = time.perf_counter() - start
    size, bs = service.classifier.image_size, service.max_batch
    xs = [decode_image(data, size, cfg["max_pixels"], name) for name, data in images]
    done, seconds = 0, 0.0
    deadline = time.perf_counter() + max_seconds
    while done < requests and time.perf_counter() < deadline:
        n = min(bs, requests - done)
        items = [Item(name="x", x=xs[(done + j) % len(xs)], seed=0, key=done + j) for j in range(n)]
        t0 = time.perf_counter()
        service.handle_batch(items)
        seconds += time.perf_counter() - t0
        done += n
    return {"batch_size": bs, "threads": torch.get_num_threads(), "images": done, "seconds": round(seconds, 3),
            "throughput_images_s": round(done / seconds, 3), "start_seconds": round(start_s, 2)}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    s = report["service"]
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms, client side)")
    ax.set_yscale("log")
    ax.set_title(f"scc serve: {s['model']} {s['defense']} {s['backend']} x{report.get('replicas', '?')} replicas",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loadtest(url: str, images: str = "digits", levels: list[int] = (1, 4, 16, 64), requests: int = 256,
             max_seconds: float = 120.0, seed: int | None = None, replicas: int | None = None,
             with_in_process: bool = True, compile_cache: str | None = None, log=print) -> dict:
    """Every concurrency level against the service at `url`, then the in-process reference; the JSON report."""
    from ..provenance import hardware, versions

    info = get_json(url, "/v1/info")
    spec = images
    images = load_images(spec, limit=max(requests, 1))
    if seed is not None and not info.get("client_seeds", False):
        raise SccError(f"{url} refuses client-chosen seeds: drop --seed, or restart it with --client-seeds")
    load_before = os.getloadavg()
    run_level(url, images, 1, min(4, requests), 30, seed)  # connections and caches, not reported
    report = {"url": url, "service": {k: info.get(k) for k in ("model", "defense", "backend", "dtype", "max_batch",
                                                                 "batch_wait_ms", "threads", "buckets", "device")},
              "replicas": replicas, "images": spec, "requests_per_level": requests, "levels": []}
    for c in levels:
        row = run_level(url, images, c, requests, max_seconds, seed)
        report["levels"].append(row)
        lat = row["latency_ms"] or {}
        log(f"c={c:3d}  {row['throughput_images_s'] or 0:8.1f} img/s  p50 {lat.get('p50', float('nan')):8.1f} ms  "
            f"p95 {lat.get('p95', float('nan')):8.1f}  p99 {lat.get('p99', float('nan')):8.1f}  "
            f"batch {row['mean_batch_size']}  errors {row['error_count']}")
    if with_in_process:
        ref = in_process(info, images, requests, max_seconds, compile_cache)
        report["in_process"] = ref
        for row in report["levels"]:
            row["overhead_ratio"] = round(row["throughput_images_s"] / ref["throughput_images_s"], 3) \
                if row["throughput_images_s"] else None
            if replicas and row["throughput_images_s"]:  # per replica: each replica runs one such runner
                row["overhead_ratio_per_replica"] = round(row["overhead_ratio"] / replicas, 3)
        log(f"in-process batch handler, batch {ref['batch_size']}, {ref['threads']} thread(s): "
            f"{ref['throughput_images_s']:.1f} img/s; service/in-process: "
            + ", ".join(f"c={r['concurrency']} {r['overhead_ratio']}" for r in report["levels"]))
    report["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    report["client"] = {"hardware": hardware("cpu"), "versions": versions(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    report["server_versions"] = info.get("versions")
    return report

"""The Ray Serve application of `scc serve` (FastAPI ingress + @serve.batch + the EngineQueue): the only module
that imports Ray and FastAPI, and only inside the functions that need them.

    serve.run(build_app({"model": "scc-tiny-digits", "defense": "scc"}))    # or `import_path: scc.serve.app:build_app`
    run(cfg, host="127.0.0.1", port=8000)                                   # local Ray, serve until SIGINT/SIGTERM
"""
import asyncio
import json
import os
import time
from typing import Mapping

from ..errors import SccError
from .client import wait_ready
from .requests import Item, RequestError, parse_request
from .service import DEFAULTS, EngineQueue, Service, service_config


def _deployment_class():
    """The Ray Serve deployment class (defined on demand: importing this module needs no Ray yet)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from ray import serve
    from ray.serve import metrics

    # No `from __future__ import annotations` in this module: FastAPI reads `request: Request` from the handler's
    # real annotation (a string would be resolved in the replica's unpickled globals, lack Request, and read
    # `request` as a query parameter: 422).
    app = FastAPI(title="scc", description="Test-time defended CLIP zero-shot classifier")

    @serve.deployment(name="scc")
    @serve.ingress(app)
    class SccDeployment:
        def __init__(self, cfg: dict):
            self.service = Service(cfg)  # loads, builds and warms every bucket before Serve marks it ready
            self.cfg = self.service.cfg
            self.queue = EngineQueue(self.service.handle_batch, self.cfg["max_batch"], on_batch=self._observe_batch)
            self.classify_batch.set_max_batch_size(self.cfg["max_batch"])
            self.classify_batch.set_batch_wait_timeout_s(self.cfg["batch_wait_ms"] / 1e3)
            ms = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
            self.m_requests = metrics.Counter("scc_requests", "HTTP requests to /v1/classify", tag_keys=("status",))
            self.m_images = metrics.Counter("scc_images", "images answered")
            self.m_errors = metrics.Counter("scc_errors", "errors by kind", tag_keys=("kind",))
            self.m_batch = metrics.Histogram("scc_batch_size", "images per engine batch",
                                             boundaries=[b + 0.5 for b in range(1, self.cfg["max_batch"] + 1)])
            self.m_queue = metrics.Histogram("scc_queue_ms", "wait from arrival to batch start (ms)", boundaries=ms)
            self.m_compute = metrics.Histogram("scc_compute_ms", "engine time per batch (ms)", boundaries=ms)
            self.m_latency = metrics.Histogram("scc_request_ms", "request latency in the replica (ms)", boundaries=ms)

        def check_health(self):
            if not self.service.ready:
                raise RuntimeError("buckets not warm yet")

        # Ray 2.60 forms the next @serve.batch batch (batch_wait_timeout_s after its first item) while the previous
        # one still runs, so with one engine call at a time batches of 1-2 queue up behind it (measured: mean batch
        # 1.5 at 16 concurrent requests). Every formed batch enters at once instead (max_concurrent_batches) and
        # the EngineQueue below hands the engine everything pending when it is free: full batches under load.
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=256)
        async def classify_batch(self, items: list[Item]) -> list[dict]:
            results = await self.queue.submit(items)
            good = [r for r in results if "error" not in r]
            for r in good:
                self.m_queue.observe(r["queue_ms"])
            return results

        def _observe_batch(self, results: list[dict]) -> None:
            good = [r for r in results if "error" not in r]
            if good:
                self.m_batch.observe(len(good))
                self.m_compute.observe(good[0]["compute_ms"])

        def _fail(self, status: int, message: str, kind: str):
            self.m_requests.inc(tags={"status": str(status)})
            self.m_errors.inc(tags={"kind": kind})
            return JSONResponse({"error": message}, status_code=status)

        @app.post("/v1/classify")
        async def classify(self, request: Request):
            start = time.perf_counter()
            limit = self.cfg["max_body_bytes"]
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return self._fail(413, f"body of {length} bytes exceeds the limit of {limit}", "too_large")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return self._fail(413, f"body exceeds the limit of {limit} bytes", "too_large")
            query: dict[str, list[str]] = {}
            for k, v in request.query_params.multi_items():
                query.setdefault(k, []).append(v)
            try:
                items = parse_request(request.headers.get("content-type"), bytes(body), query,
                                      self.service.classifier.image_size, self.cfg["max_pixels"], limit,
                                      self.cfg["max_images"], len(self.service.classifier.labels),
                                      self.cfg["client_seeds"])
            except RequestError as err:
                kind = {413: "too_large", 415: "bad_type", 403: "seed_refused"}.get(err.status, "bad_request")
                return self._fail(err.status, str(err), kind)
            for it in items:
                it.enqueued = time.perf_counter()
            try:
                # only readable images enter a batch; shield: a timed-out request leaves its images in their
                # batch, which completes for the other requests in it
                futures = [asyncio.ensure_future(self.classify_batch(it)) for it in items if it.error is None]
                answers = iter(await asyncio.wait_for(asyncio.shield(asyncio.gather(*futures)),
                                                      self.cfg["timeout_s"]))
                results = [next(answers) if it.error is None else
                           {"name": it.name, "error": it.error, "error_kind": it.error_kind or "decode"}
                           for it in items]
            except asyncio.TimeoutError:
                return self._fail(504, f"no answer within {self.cfg['timeout_s']} s", "timeout")
            except Exception as err:  # never a lost request: the client gets a reason
                return self._fail(500, f"internal error: {type(err).__name__}: {err}", "internal")
            for r in results:
                if "error" in r:
                    self.m_errors.inc(tags={"kind": r.get("error_kind", "decode")})
            ok = [r for r in results if "error" not in r]
            if not ok:
                return self._fail(500 if any(r.get("error_kind") == "internal" for r in results) else 400,
                                  "; ".join(r["error"] for r in results), "internal")
            self.m_images.inc(len(ok))
            self.m_requests.inc(tags={"status": "200"})
            latency = (time.perf_counter() - start) * 1e3
            self.m_latency.observe(latency)
            info = self.service.info_static
            # serialised here: FastAPI's generic encoder walks the nested dict and costs ~1 ms per request
            return Response(json.dumps({"results": results, "defense": info["defense"], "model": info["model"],
                                        "backend": info["backend"], "latency_ms": round(latency, 3)}),
                            media_type="application/json")

        @app.get("/healthz")
        async def healthz(self):
            return {"status": "alive"}

        @app.get("/readyz")
        async def readyz(self):
            if not self.service.ready:
                return JSONResponse({"status": "warming up"}, status_code=503)
            return {"status": "ready", "buckets": self.service.buckets}

        @app.get("/v1/info")
        async def info(self):
            return self.service.info()

    return SccDeployment


def deployment_options(cfg: Mapping) -> dict:
    """Ray Serve options: replicas or autoscaling, max_ongoing_requests above the batch size, CPUs per replica."""
    # requests beyond max_ongoing wait in the proxy's router, which retries with back-off: measured 32.6 images/s
    # at 64 concurrent requests with 16 per replica vs 120 with 64 (compiled tiny SCC, 2 replicas); queueing in the
    # replica's EngineQueue is cheap, and the request timeout still bounds the wait
    max_ongoing = cfg["max_ongoing"] or max(2 * cfg["max_batch"], 64)
    if max_ongoing < cfg["max_batch"]:
        raise SccError(f"max_ongoing ({max_ongoing}) must be at least max_batch ({cfg['max_batch']}): @serve.batch "
                       "only batches the requests a replica holds")
    opts = {"max_ongoing_requests": max_ongoing,
            "ray_actor_options": {"num_cpus": cfg["threads"] if cfg["device"] == "cpu" else 1,
                                  "num_gpus": 0 if cfg["device"] == "cpu" else 1,
                                  "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg["threads"]), **(
                                      {"TORCHINDUCTOR_CACHE_DIR": os.path.abspath(cfg["compile_cache"]),
                                       "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"} if cfg["compile_cache"] else {})}}},
            "health_check_period_s": 10, "graceful_shutdown_timeout_s": max(5.0, cfg["timeout_s"]),
            # one access-log line per request costs the replica CPU that the engine needs; errors are still logged
            # and every request is counted in the ray_scc_* metrics
            "logging_config": {"enable_access_log": False}}
    if cfg["min_replicas"] is not None or cfg["max_replicas"] is not None:
        lo = cfg["min_replicas"] if cfg["min_replicas"] is not None else 1
        hi = cfg["max_replicas"] if cfg["max_replicas"] is not None else max(lo, cfg["replicas"])
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                      "target_ongoing_requests": cfg["target_ongoing"] or cfg["max_batch"]}
    else:
        opts["num_replicas"] = cfg["replicas"]
    return opts


def build_app(args: Mapping | None = None):
    """The Ray Serve application: `serve.run(build_app({...}))`, or `import_path: scc.serve.app:build_app` with `args`
    in a Serve config file (every value may be a string)."""
    cfg = service_config(args)
    return _deployment_class().options(**deployment_options(cfg)).bind(cfg)


def serve_config_yaml(cfg: Mapping, host: str, port: int, timeout_s: float) -> str:
    """The Ray Serve config file equivalent to this command line (`serve deploy config.yaml`)."""
    args = {k: v for k, v in cfg.items() if v is not None and v != DEFAULTS.get(k)}
    doc = {"proxy_location": "EveryNode",
           "http_options": {"host": host, "port": port, "request_timeout_s": timeout_s},
           "applications": [{"name": "scc", "route_prefix": "/", "import_path": "scc.serve.app:build_app",
                             "args": args}]}
    try:
        import yaml

        return yaml.safe_dump(doc, sort_keys=False)
    except ImportError:  # JSON is YAML
        return json.dumps(doc, indent=2) + "\n"


def run(cfg: Mapping, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        metrics_port: int | None = None, log=print) -> int:
    """Start (or join, with `address`) Ray, deploy the application and serve until SIGINT/SIGTERM; shut down what
    was started here. With `address` it deploys onto the existing cluster and returns."""
    import signal

    import ray
    from ray import serve

    def _stop(signum, frame):
        raise KeyboardInterrupt

    started = time.perf_counter()
    remote = address is not None
    if remote:
        ray.init(address=address)
    else:
        # the replicas' own thread count comes from --threads; Ray's processes stay off the terminal
        extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg["threads"])}}, **extra)
    # after ray.init, which installs its own (aborting) SIGTERM handler: `kill PID` shuts down as cleanly as
    # Ctrl-C, also when a background shell started us with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg["timeout_s"] + 5},
                    logging_config={"enable_access_log": False})
        log(f"scc serve: deploying {cfg['model']} {cfg['defense']} on {cfg['backend']} "
            f"({cfg['replicas']} replica(s), buckets up to {cfg['max_batch']})")
        serve.run(build_app(cfg), name="scc", route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        if remote:
            log(f"scc serve: deployed onto {address} (application 'scc'; HTTP per the cluster's proxy)")
            return 0
        waited = wait_ready(url, timeout=600)
        log(f"scc serve: ready on {url} after {time.perf_counter() - started:.1f} s "
            f"(readyz {waited:.1f} s); Ctrl-C stops")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log("scc serve: shutting down")
        return 0
    finally:
        if not remote:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()



"""The Ray Serve application of `scc serve`: the only module that imports Ray and FastAPI, and only inside the
functions that need them.

    serve.run(build_app({"model": "scc-tiny-digits", "defense": "scc"}))    # or `import_path: scc.serve.app:build_app`
    run(cfg, host="127.0.0.1", port=8000)                                   # local Ray, serve until SIGINT/SIGTERM

Two deployments:
    scc        the ingress (FastAPI routes + the gRPC method Classify; 0 CPUs reserved): scc.serve.front.Front --
               token, admission, body, parsing and decoding in a thread pool, deadline, retries on a dead replica
    scc-model  the model replicas (--replicas, --threads CPUs each): scc.serve.service.Service behind a bounded
               EngineQueue; they receive decoded images and the time left, never HTTP
A model replica killed mid-request therefore costs the ingress a retry on a live replica (or a 503 with Retry-After
when none answers before the deadline), never Ray's bare "500 Internal Server Error" of a dead ingress replica.
"""
import asyncio
import json
import logging
import os
import time
import urllib.parse
from typing import Mapping

from ..errors import SccError
from .client import wait_ready
from .front import Front, Reply, error_reply, internal_reply
from .grpc_api import STATUS, ClassifyReply
from .loopback import GRPC_HOST_ENV, local_ray_env
from .proxy import HOOK, preflight, proxy_env
from .service import DEFAULTS, EngineQueue, Service, service_config

APP_NAME = "scc"
GRPC_SERVICER = "scc.serve.grpc_api.add_ClassifierServicer_to_server"
# the operator page: no framing by other sites, no outside resources, no referrer
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; "
                                           "script-src 'unsafe-inline'; frame-ancestors 'none'"}
BODY_READERS = 1024  # requests whose bodies one ingress replica may be reading at once (each costs a coroutine)


def replica_gone(err: BaseException) -> bool:
    """Whether an exception of a model call means its replica died or is unreachable (worth a retry)."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) or isinstance(getattr(err, "cause", None), RayActorError)


def _model_class():
    """The model deployment (defined on demand: importing this module needs no Ray yet)."""
    from ray import serve
    from ray.serve import metrics

    @serve.deployment(name="scc-model")
    class SccModel:
        def __init__(self, cfg: dict):
            self.service = Service(cfg)  # loads, builds and warms every bucket before Serve marks it ready
            self.cfg = self.service.cfg
            self.queue = EngineQueue(self.service.handle_batch, self.cfg["max_batch"], self.cfg["max_queue"],
                                     self.cfg["batch_wait_ms"], on_batch=self._observe_batch)
            ms = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
            self.m_images = metrics.Counter("scc_images", "images answered")
            self.m_errors = metrics.Counter("scc_errors", "images not answered, by kind", tag_keys=("kind",))
            self.m_batch = metrics.Histogram("scc_batch_size", "images per engine batch",
                                             boundaries=[b + 0.5 for b in range(1, self.cfg["max_batch"] + 1)])
            self.m_queue = metrics.Histogram("scc_queue_ms", "wait from arrival to batch start (ms)", boundaries=ms)
            self.m_compute = metrics.Histogram("scc_compute_ms", "engine time per batch (ms)", boundaries=ms)

        def check_health(self):
            if not self.service.ready:
                raise RuntimeError("buckets not warm yet")

        def _observe_batch(self, results: list[dict]) -> None:
            good = [r for r in results if "error" not in r]
            for r in results:
                if "error" in r:
                    self.m_errors.inc(tags={"kind": r.get("error_kind", "internal")})
            if good:
                self.m_images.inc(len(good))
                self.m_batch.observe(len(good))
                self.m_compute.observe(good[0]["compute_ms"])
                for r in good:
                    self.m_queue.observe(r["queue_ms"])

        async def classify(self, items: list, budget_s: float) -> list[dict]:
            """Decoded Items and the seconds left of their request -> results, in order."""
            now, stamp = time.monotonic(), time.perf_counter()
            for it in items:
                it.deadline, it.enqueued = now + budget_s, stamp
            return await self.queue.submit(items)

        async def ready(self) -> bool:
            return self.service.ready

        async def compare(self, items: list, budget_s: float) -> list[dict]:
            """classify(), each answer with the undefended classifier's beside it (the operator page)."""
            results = await self.classify(items, budget_s)
            plain = await asyncio.get_running_loop().run_in_executor(self.queue.pool, self.service.undefended, items)
            for r, p in zip(results, plain):
                if "error" not in r:
                    r["undefended"] = p
            return results

        async def info(self) -> dict:
            info = self.service.info()
            info["queue"] = {"pending": len(self.queue.pending), "max_queue": self.queue.max_queue,
                             **self.queue.counts}
            return info

    return SccModel


def _ingress_class():
    """The ingress deployment: FastAPI routes and the gRPC method, both through one Front."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from ray import serve
    from ray.serve import metrics
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from . import ui
    from .front import read_body
    from .requests import RequestError

    # No `from __future__ import annotations` in this module: FastAPI reads `request: Request` from the handler's
    # real annotation (a string would be resolved in the replica's unpickled globals, lack Request, and read
    # `request` as a query parameter: 422).
    app = FastAPI(title="scc", description="Test-time defended CLIP zero-shot classifier", docs_url=None,
                  redoc_url=None, openapi_url=None)

    def respond(reply) -> Response:
        # serialised here: FastAPI's generic encoder walks the nested dict and costs ~1 ms per request
        return Response(json.dumps(reply.body), status_code=reply.status, headers=reply.headers,
                        media_type="application/json")

    # one error shape for every status: Starlette's own 404/405 and validation errors answer {"error": ...} too
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        reply = error_reply(exc.status_code, str(exc.detail))
        reply.headers.update(exc.headers or {})
        return respond(reply)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return respond(error_reply(422, "invalid request: see the API in the service's documentation"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return respond(internal_reply(f"{request.method} {request.url.path}", exc))

    async def body_of(request: Request):
        try:
            async for chunk in request.stream():
                yield chunk
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected before sending its whole body") from None

    @serve.deployment(name=APP_NAME)
    @serve.ingress(app)
    class SccIngress:
        def __init__(self, cfg: dict, model, ui_key: bytes | None = None):
            self.cfg = cfg
            self.model = model
            # the operator page's session-cookie key: one per service start, shared by its ingress replicas
            self.ui_key = ui_key or ui.session_key()
            self.front = Front(cfg, self._call, self._describe, replica_gone, call_compare=self._compare)
            ms = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
            self.m_requests = metrics.Counter("scc_requests", "requests to Classify (HTTP and gRPC)",
                                              tag_keys=("status",))
            self.m_latency = metrics.Histogram("scc_request_ms", "request latency in the ingress (ms)",
                                               boundaries=ms)

        async def _call(self, items, budget_s):
            return await self.model.classify.remote(items, budget_s)

        async def _describe(self):
            return await self.model.info.remote()

        async def _compare(self, items, budget_s):
            return await self.model.compare.remote(items, budget_s)

        def _count(self, reply, start: float) -> None:
            self.m_requests.inc(tags={"status": str(reply.status)})
            self.m_latency.observe((time.perf_counter() - start) * 1e3)

        async def _classify(self, request: Request, **options) -> Response:
            """Front.classify of an HTTP request (its query, its client's address, its body), counted."""
            start = time.perf_counter()
            query: dict[str, list[str]] = {}
            for k, v in request.query_params.multi_items():
                query.setdefault(k, []).append(v)
            client = request.client.host if request.client else None
            reply = await self.front.classify(request.headers, query, body_of(request), client, **options)
            self._count(reply, start)
            return respond(reply)

        @app.post("/v1/classify")
        async def classify(self, request: Request):
            return await self._classify(request)

        async def Classify(self, request: bytes, grpc_context=None):
            """gRPC scc.v1.Classifier/Classify (scc.serve.grpc_api): the token from the metadata and the message's
            size are checked by Front.classify_grpc before the message is parsed."""
            import grpc

            start = time.perf_counter()
            metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
            peer = grpc_context.peer() if grpc_context is not None and hasattr(grpc_context, "peer") else None
            reply = await self.front.classify_grpc(metadata, request, peer)
            self._count(reply, start)
            if reply.status == 200:
                return ClassifyReply(json=json.dumps(reply.body))
            if grpc_context is not None:
                grpc_context.set_code(getattr(grpc.StatusCode, STATUS.get(reply.status, "INTERNAL")))
                grpc_context.set_details(reply.body["error"])
                trailing = [("scc-error-code", reply.body.get("code", "error"))]
                if "Retry-After" in reply.headers:
                    trailing.append(("retry-after", reply.headers["Retry-After"]))
                grpc_context.set_trailing_metadata(trailing)
            return ClassifyReply(json=json.dumps(reply.body))

        @app.get("/ui")
        async def ui_page(self, request: Request):
            """The operator page (scc serve --ui), or its sign-in form when the server has a token."""
            if not self.cfg["ui"]:
                return respond(error_reply(404, "no operator page: start the server with --ui"))
            if not ui.signed_in(request.cookies, self.front.digest, self.ui_key):
                return Response(ui.login(), media_type="text/html", headers=PAGE_HEADERS)
            info = await self.front.within(lambda left: self.front.static_info(), time.monotonic() + 10)
            what = f"{info['model']} · {info['spec']} · {info['backend']}" if info else ""
            return Response(ui.page(what), media_type="text/html", headers=PAGE_HEADERS)

        @app.post("/ui/login")
        async def ui_login(self, request: Request):
            if not self.cfg["ui"]:
                return respond(error_reply(404, "no operator page: start the server with --ui"))
            try:
                form = urllib.parse.parse_qs((await read_body(body_of(request), 4096, self.cfg["body_timeout_s"]))
                                             .decode("utf-8", "replace"))
            except RequestError as err:
                return respond(error_reply(err.status, str(err), code=err.code))
            token = (form.get("token") or [""])[0]
            if self.front.digest is None or not self.front.authorized(f"Bearer {token}"):
                self.front.counts["unauthorized"] += 1
                return Response(ui.login("wrong token"), status_code=401, media_type="text/html",
                                headers=PAGE_HEADERS)
            return Response(status_code=303, headers={
                "Location": "/ui",
                "Set-Cookie": ui.cookie_header(self.ui_key, self.front.digest, request.url.scheme == "https"),
                **PAGE_HEADERS})

        @app.post("/ui/classify")
        async def ui_classify(self, request: Request):
            """The page's call: one image, the defended answer with the undefended one beside it."""
            if not self.cfg["ui"]:
                return respond(error_reply(404, "no operator page: start the server with --ui"))
            return await self._classify(request, compare=True,
                                        signed_in=ui.signed_in(request.cookies, self.front.digest, self.ui_key))

        @app.get("/healthz")
        async def healthz(self):
            return {"status": "alive"}

        @app.get("/readyz")
        async def readyz(self):
            """200 once a model replica answers within 2 s (every bucket warm), else 503."""
            deadline = time.monotonic() + 2.0
            ok = await self.front.within(lambda left: self.model.ready.remote(), deadline)
            body = {"status": "ready" if ok else "not ready", "replicas": _replica_states()}
            return respond(Reply(200, body) if ok else Reply(503, body, {"Retry-After": "1"}))

        @app.get("/v1/info")
        async def info(self, request: Request):
            """The service's description: behind the token when there is one; no pids, no paths."""
            if not self.front.authorized(request.headers.get("authorization")):
                return respond(self.front.unauthorized())
            deadline = time.monotonic() + self.cfg["timeout_s"]
            info = await self.front.within(lambda left: self.front.info(), deadline)
            if info is None:
                return respond(error_reply(503, "no model replica answered", self.cfg["retry_after_s"],
                                           code="deadline"))
            info["replicas"] = _replica_states()
            return respond(Reply(200, info))

    return SccIngress


def _replica_states() -> dict | None:
    """{"RUNNING": n, ...} of the model deployment (Serve's controller), or None when unavailable."""
    try:
        from ray import serve

        states = serve.status().applications[APP_NAME].deployments["scc-model"].replica_states
        return {str(getattr(k, "value", k)): v for k, v in states.items()}
    except Exception:  # a status probe must never fail the readiness answer it decorates
        return None


def model_options(cfg: Mapping) -> dict:
    """The model replicas: replicas or autoscaling, a queue-sized max_ongoing_requests, CPUs per replica."""
    # every request holds >= 1 image, so at most max_queue requests wait in a replica's EngineQueue and max_batch
    # more are being computed; Ray's router holds the rest (each bounded by its deadline in the ingress)
    max_ongoing = cfg["max_ongoing"] or cfg["max_queue"] + cfg["max_batch"]
    if max_ongoing < cfg["max_batch"]:
        raise SccError(f"max_ongoing ({max_ongoing}) must be at least max_batch ({cfg['max_batch']}): the queue "
                       "only batches the requests a replica holds")
    opts = {"max_ongoing_requests": max_ongoing,
            "ray_actor_options": {"num_cpus": cfg["threads"] if cfg["device"] == "cpu" else 1,
                                  "num_gpus": 0 if cfg["device"] == "cpu" else 1,
                                  # no TORCHINDUCTOR_CACHE_DIR here: each replica points Inductor at --compile-cache
                                  # only after checking it (scc.serve.service.prepare_compile_cache)
                                  "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg["threads"])}}},
            "health_check_period_s": 2, "health_check_timeout_s": 30,
            "graceful_shutdown_timeout_s": max(5.0, cfg["timeout_s"]),
            # one access-log line per request costs the replica CPU that the engine needs; errors are still logged
            "logging_config": {"enable_access_log": False}}
    if cfg["min_replicas"] is not None or cfg["max_replicas"] is not None:
        lo = cfg["min_replicas"] if cfg["min_replicas"] is not None else 1
        hi = cfg["max_replicas"] if cfg["max_replicas"] is not None else max(lo, cfg["replicas"])
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                      "target_ongoing_requests": cfg["target_ongoing"] or cfg["max_batch"]}
    else:
        opts["num_replicas"] = cfg["replicas"]
    return opts


def ingress_options(cfg: Mapping) -> dict:
    """The ingress: no CPU reserved (it parses and forwards), room for twice its admission bound plus BODY_READERS
    requests still sending their bodies (read before admission), so that overload and slow clients are answered by
    Front (503/429/408, JSON) rather than queued in Ray's proxy."""
    bound = cfg["max_queue"] * max(cfg["replicas"], cfg["max_replicas"] or 0)
    return {"num_replicas": cfg["ingress_replicas"], "max_ongoing_requests": 2 * bound + 16 + BODY_READERS,
            "ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 2,
            "graceful_shutdown_timeout_s": max(5.0, cfg["timeout_s"]),
            "logging_config": {"enable_access_log": False}}


def build_app(args: Mapping | None = None):
    """The Ray Serve application: `serve.run(build_app({...}))`, or `import_path: scc.serve.app:build_app` with `args`
    in a Serve config file (every value may be a string)."""
    from .ui import session_key

    cfg = service_config(args)
    model = _model_class().options(**model_options(cfg)).bind(cfg)
    # a random key per application built (one `scc serve` or `serve deploy`), the same in every ingress replica, so
    # that a session cookie one replica issued is good on the others and on none of another start
    return _ingress_class().options(**ingress_options(cfg)).bind(cfg, model, session_key())


def http_options(host: str, port: int, timeout_s: float, tls_cert: str | None = None,
                 tls_key: str | None = None) -> dict:
    opts = {"host": host, "port": port, "request_timeout_s": timeout_s + 5}
    if tls_cert:
        opts.update(ssl_certfile=os.path.abspath(tls_cert), ssl_keyfile=os.path.abspath(tls_key))
    return opts


def grpc_options(port: int | None, timeout_s: float) -> dict | None:
    return None if not port else {"port": port, "grpc_servicer_functions": [GRPC_SERVICER],
                                  "request_timeout_s": timeout_s + 5, "enable_reflection": False}


def serve_config_yaml(cfg: Mapping, host: str, port: int, timeout_s: float, tls_cert: str | None = None,
                      tls_key: str | None = None, grpc_port: int | None = None) -> str:
    """The Ray Serve config file equivalent to this command line (`serve deploy config.yaml`). The token appears as
    its file (`token_file`, read by the ingress replica), never as a digest; what a Serve config cannot set (the
    proxy's read deadlines, TLS suites, gRPC TLS and message size) is said in the header comment."""
    args = {k: v for k, v in cfg.items() if v is not None and v != DEFAULTS.get(k) and k != "token_sha256"}
    doc = {"proxy_location": "EveryNode", "http_options": http_options(host, port, timeout_s, tls_cert, tls_key)}
    if grpc_port:
        doc["grpc_options"] = grpc_options(grpc_port, timeout_s)
    doc["applications"] = [{"name": APP_NAME, "route_prefix": "/", "import_path": "scc.serve.app:build_app",
                            "args": args}]
    env = proxy_env(cfg["header_timeout_s"], cfg["body_timeout_s"], cfg["max_body_bytes"])
    head = ("# scc serve: a Serve config cannot set the proxy's header/body read deadlines, TLS suites, gRPC TLS or\n"
            "# gRPC message size; start the cluster's Ray with runtime_env worker_process_setup_hook "
            f"{HOOK} and env_vars\n# {json.dumps(env)} (or put a reverse proxy with read timeouts and TLS in "
            "front of it)\n")
    try:
        import yaml

        return head + yaml.safe_dump(doc, sort_keys=False)
    except ImportError:  # JSON is YAML
        return head + json.dumps(doc, indent=2) + "\n"


def effective_options() -> dict:
    """Serve's HTTP and gRPC options as its controller reports them: what its proxies actually run with."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return {"http": dict(details.get("http_options") or {}), "grpc": dict(details.get("grpc_options") or {})}


def option_mismatches(asked_http: Mapping, asked_grpc: Mapping | None, effective: Mapping) -> list[str]:
    """Each option asked for that Serve does not run with, as 'HTTP port 8001 (asked 8000)'. HTTPS asked for and
    plaintext served (or the other way round) is a mismatch; gRPC is compared when it was asked for."""
    def same(a, b) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return float(a) == float(b)
        return (a or None) == (b or None)

    out = []
    http = effective.get("http") or {}
    for k, v in {"ssl_certfile": None, "ssl_keyfile": None, **asked_http}.items():
        if not same(http.get(k), v):
            out.append(f"HTTP {k} {http.get(k)!r} (asked {v!r})")
    if asked_grpc:
        grpc = effective.get("grpc") or {}
        if not same(grpc.get("port"), asked_grpc["port"]):
            out.append(f"gRPC port {grpc.get('port')!r} (asked {asked_grpc['port']!r})")
        missing = set(asked_grpc["grpc_servicer_functions"]) - set(grpc.get("grpc_servicer_functions") or ())
        if missing:
            out.append(f"gRPC servicers {grpc.get('grpc_servicer_functions')!r} (asked {sorted(missing)!r})")
    return out


def check_grpc_tls(host: str, port: int, timeout_s: float = 15.0) -> None:
    """SccError unless the gRPC port completes a TLS handshake (within timeout_s, retrying while it starts)."""
    import socket
    import ssl

    from .selftest import target as local_target

    target = local_target(host)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # our own port: the handshake is what is checked
    ctx.set_alpn_protocols(["h2"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((target, port), timeout=5) as sock:
                with ctx.wrap_socket(sock, server_hostname=target) as tls:
                    tls.version()
            return
        except ConnectionRefusedError as err:
            if time.monotonic() > deadline:
                raise SccError(f"gRPC port {target}:{port}: nothing listens there ({err.strerror}); the service is "
                               "stopped rather than left without TLS on gRPC") from None
            time.sleep(0.25)
        except (OSError, ssl.SSLError) as err:
            raise SccError(f"gRPC port {target}:{port} does not speak TLS although --tls-cert was given "
                           f"({type(err).__name__}); the service is stopped rather than serve the token in the clear "
                           "(a Serve that was already running keeps its own gRPC server: shut it down first)") from None


def _quiet_ray_logs() -> None:
    """Ray Serve's driver-side INFO lines ("Connecting to existing Serve app ... will not be applied", ...) read
    like failures on a normal start; the service prints its own status lines instead."""
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(cfg: Mapping, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        metrics_port: int | None = None, tls_cert: str | None = None, tls_key: str | None = None,
        grpc_port: int | None = None, log=print) -> int:
    """Start (or join, with `address`) Ray, deploy the application and serve until SIGINT/SIGTERM; shut down what
    was started here. With `address` it deploys onto the existing cluster and returns. Either way, Serve's effective
    HTTP and gRPC options are read back before the application is deployed, and a difference from what was asked is
    an SccError (one line), as is a gRPC port without TLS when --tls-cert was given. Before Ray starts, the Ray and
    uvicorn internals the proxy's hardening patches are checked (scc.serve.proxy.preflight: one line naming the
    versions and what is missing); a local service, once ready, passes the self-test of scc.serve.selftest or is
    stopped with one line naming what failed."""
    import signal

    from .selftest import StalledHeaders, self_test

    def _stop(signum, frame):
        raise KeyboardInterrupt

    started = time.perf_counter()
    remote = address is not None
    env = proxy_env(cfg["header_timeout_s"], cfg["body_timeout_s"], cfg["max_body_bytes"],
                    tls_cert if grpc_port else None, tls_key if grpc_port else None)
    if not remote:
        os.environ.update(local_ray_env())  # before Ray is imported: it reads the loopback switch at import
        os.environ[GRPC_HOST_ENV] = host
        os.environ.update(env)  # Ray's processes inherit it (Serve reads its gRPC message limit at import)
    preflight()  # what every worker's setup hook checks, here first: one line instead of workers that never start
    import ray
    from ray import serve

    _quiet_ray_logs()
    # the replicas' own thread count comes from --threads; the proxy's settings from `env` and the setup hook
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": str(cfg["threads"]), GRPC_HOST_ENV: host, **env},
                   "worker_process_setup_hook": HOOK}
    if remote:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)
    else:
        # Ray's processes stay off the terminal
        extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env=runtime_env, **extra)
    # after ray.init, which installs its own (aborting) SIGTERM handler: `kill PID` shuts down as cleanly as
    # Ctrl-C, also when a background shell started us with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    deployed, probe = False, None
    try:
        asked_http, asked_grpc = http_options(host, port, cfg["timeout_s"], tls_cert, tls_key), \
            grpc_options(grpc_port, cfg["timeout_s"])
        serve.start(http_options=asked_http, grpc_options=asked_grpc,
                    logging_config={"enable_access_log": False, "log_level": "WARNING"})
        # a Serve already running there keeps its own options (Ray only warns): refuse before deploying under them
        mismatches = option_mismatches(asked_http, asked_grpc, effective_options())
        if mismatches:
            raise SccError(f"Serve on {address or 'this Ray'} runs with other options than asked: "
                           f"{'; '.join(mismatches)}; it was already running and keeps its own (shut it down with "
                           "`serve shutdown`, or ask for the options it has); nothing was deployed")
        if not remote:  # the proxy listens before the replicas are warm: the header-deadline probe starts now
            probe = StalledHeaders(host, port, bool(tls_cert), cfg["header_timeout_s"]).start()
        log(f"scc serve: deploying {cfg['model']} {cfg['defense']} on {cfg['backend']} "
            f"({cfg['replicas']} model replica(s), buckets up to {cfg['max_batch']}, "
            f"draws {'replayed from client seeds/keys' if cfg['replay_draws'] else 'fresh per image'})")
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        deployed = True
        if grpc_port and tls_cert:
            check_grpc_tls(host, grpc_port)
        scheme = "https" if tls_cert else "http"
        url = f"{scheme}://{host}:{port}"
        if remote:
            log(f"scc serve: deployed onto {address} (application '{APP_NAME}'; HTTP {host}:{port}"
                + (f", gRPC {grpc_port}" if grpc_port else "") + ", as read back from Serve)")
            return 0
        waited = wait_ready(url, timeout=600)
        failures, passed = self_test(host, port, probe, bool(tls_cert), grpc_port)
        if failures:
            raise SccError(f"scc serve: start-up self-test failed: {'; '.join(failures)}; the service is stopped")
        log(f"scc serve: self-test passed: {passed}")
        log(f"scc serve: ready on {url}" + (f" and gRPC{' (TLS)' if tls_cert else ''} {host}:{grpc_port}"
                                            if grpc_port else "") +
            f" after {time.perf_counter() - started:.1f} s (readyz {waited:.1f} s); Ctrl-C stops")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log("scc serve: shutting down")
        return 0
    except SccError:
        if remote and deployed:  # never leave an application up under options it was refused for
            serve.delete(APP_NAME)
        raise
    finally:
        if probe is not None:
            probe.stop.set()
        if not remote:
            try:
                if deployed:
                    serve.delete(APP_NAME)  # replicas drain their requests and stop
            finally:
                # not serve.shutdown(): its controller kills itself under its own graceful_shutdown task, which Ray
                # reports as a failed task; ray.shutdown() stops the controller and proxy of this local Ray anyway
                ray.shutdown()

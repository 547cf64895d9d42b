"""What one `scc serve` model replica owns, plain Python tested without Ray: the backend runner with every bucket
warm, the batch handler and the bounded continuous-batching queue in front of it.

    service = Service(service_config(model="scc-tiny-digits", defense="scc", backend="compiled"))
    results = service.handle_batch(items)          # Items -> result dicts, in order; a bad item never fails others
    queue = EngineQueue(service.handle_batch, max_batch=8, max_queue=64); await queue.submit(items)

Randomness. Image b's draws are a function of (seed, key) only (scc.draws.keyed_draws). By default (fresh draws)
the seed of an image is derive_seed(replica secret, "fresh:" + nonce), where the nonce is a 128-bit secret the front
door draws for each request, followed by the image's index in it: whatever keys a client sends, in one request or in
two, no two images meet the same draws. With
`replay_draws` (an explicit server flag) the seed is the client's `?seed=` (or the service's --seed/secret) and the
answer equals `scc.defend(clf, defense, seed=seed)(x, keys=[key])` on the eager module, whatever batch it was in.
"""
import asyncio
import logging
import os
import secrets
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import torch

from ..backends import make_runner
from ..backends.artifacts import (artifact_path, cache_mac_key, enable_compile_cache, load_compile_artifacts,
                                  save_compile_artifacts)
from ..batching import padded_chunks, power_of_two_buckets
from ..defenses import defend, split_spec
from ..draws import derive_seed
from ..errors import SccError
from ..models import TINY_NAME, load
from ..precision import dtype_name, resolve_dtype
from ..provenance import versions
from .requests import REFUSE_ASPECT, Item, Limits, image_formats

log = logging.getLogger("scc.serve")
PROCESS_ID = secrets.token_hex(4)  # names this process in /v1/info (its pid is not shown)

DEFAULTS = {
    "model": TINY_NAME, "pretrained": None, "labels": None, "templates": None, "defense": "scc",
    "backend": "eager", "dtype": "auto", "device": "cpu", "max_batch": 8, "batch_wait_ms": 2.0, "seed": None,
    "threads": 1, "top_k": 5, "max_body_bytes": 16 * 2 ** 20, "max_pixels": None, "max_request_pixels": None,
    "max_images": 64, "timeout_s": 30.0, "body_timeout_s": 10.0, "max_queue": 64, "retry_after_s": 1,
    "decode_threads": 2, "replicas": 1, "ingress_replicas": 1, "min_replicas": None, "max_replicas": None,
    "target_ongoing": None, "max_ongoing": None, "compile_cache": None, "cache_key_file": None,
    "replay_draws": False, "token_sha256": None, "token_file": None, "max_aspect": REFUSE_ASPECT,
    "image_formats": "png,jpeg,webp", "max_client_requests": 32, "header_timeout_s": 10.0, "ui": False,
}
ALIASES = {"client_seeds": "replay_draws"}  # the flag's name before fresh per-request draws became the default
INTS = ("max_batch", "threads", "top_k", "max_body_bytes", "max_pixels", "max_request_pixels", "max_images",
        "max_queue", "decode_threads", "replicas", "ingress_replicas", "min_replicas", "max_replicas", "max_ongoing",
        "seed", "retry_after_s", "max_client_requests")
OPTIONAL = ("seed", "min_replicas", "max_replicas", "max_ongoing", "max_pixels", "max_request_pixels")
BOOLS = ("replay_draws", "ui")


def _bool(name: str, value) -> bool:
    if isinstance(value, str):  # a `serve deploy` YAML may hold strings
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SccError(f"serve setting {name} must be true or false, got {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def service_config(args: Mapping | None = None, **overrides) -> dict:
    """DEFAULTS updated by `args` (a build_app/`serve deploy` args dict, strings allowed) and overrides, typed."""
    given = {ALIASES.get(k, k): v for k, v in {**(args or {}), **overrides}.items()}
    cfg = {**DEFAULTS, **given}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise SccError(f"unknown serve setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    for k in INTS:
        if cfg[k] is not None and cfg[k] != "":
            try:
                cfg[k] = int(cfg[k])
            except (TypeError, ValueError):
                raise SccError(f"serve setting {k} must be an integer, got {cfg[k]!r}") from None
        else:
            cfg[k] = None if k in OPTIONAL else DEFAULTS[k]
    for k in ("batch_wait_ms", "timeout_s", "body_timeout_s", "target_ongoing", "max_aspect", "header_timeout_s"):
        if cfg[k] is not None:
            cfg[k] = float(cfg[k])
    for k in BOOLS:
        cfg[k] = _bool(k, cfg[k])
    for k in ("labels", "templates"):
        if isinstance(cfg[k], str):
            cfg[k] = [t.strip() for t in cfg[k].split("|" if k == "templates" else ",")]
    if cfg["max_batch"] < 1 or cfg["threads"] < 1 or cfg["replicas"] < 1 or cfg["ingress_replicas"] < 1:
        raise SccError("max_batch, threads, replicas and ingress_replicas must be positive integers")
    if cfg["max_queue"] < cfg["max_batch"]:
        raise SccError(f"max_queue ({cfg['max_queue']}) must be at least max_batch ({cfg['max_batch']}): a full "
                       "batch has to fit in the queue")
    if cfg["max_aspect"] < 1 or cfg["max_client_requests"] < 1 or cfg["header_timeout_s"] <= 0:
        raise SccError(f"max_aspect ({cfg['max_aspect']}) must be >= 1, max_client_requests "
                       f"({cfg['max_client_requests']}) >= 1 and header_timeout_s ({cfg['header_timeout_s']}) > 0")
    cfg["image_formats"] = ",".join(f.lower() for f in image_formats(cfg["image_formats"]))
    if cfg["max_images"] > cfg["max_queue"]:
        raise SccError(f"max_images ({cfg['max_images']}) must not exceed max_queue ({cfg['max_queue']}): a "
                       "request larger than the queue could never be admitted")
    return cfg


def limits_of(cfg: Mapping, image_size: int) -> Limits:
    """The request limits of a service with this configuration and model input size."""
    return Limits.for_model(image_size, cfg["max_body_bytes"], cfg["max_pixels"], cfg["max_request_pixels"],
                            cfg["max_images"], max_aspect=cfg["max_aspect"], formats=cfg["image_formats"])


def replica_memory() -> dict:
    """This process: a random id (stable while it lives; not its pid) and resident memory (MB, from /proc; None where
    /proc is absent)."""
    rss = None
    try:
        with open("/proc/self/statm") as f:
            rss = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 2)
    except (OSError, ValueError, IndexError):
        pass
    return {"id": PROCESS_ID, "rss_mb": rss}


_PRIVATE_CACHE: str | None = None  # this process's private Inductor folder, made once


def private_inductor_cache() -> str:
    """Point Inductor (and Triton) at a folder only this process can use (mode 0700, a fresh name under the
    temporary folder, made once per process and removed when it exits) and turn its remote caches off: nothing
    another user wrote can be read as a cache entry. Returns it."""
    global _PRIVATE_CACHE
    if _PRIVATE_CACHE is None or not os.path.isdir(_PRIVATE_CACHE):
        import atexit
        import shutil

        _PRIVATE_CACHE = tempfile.mkdtemp(prefix="scc-inductor-")  # 0700, a fresh name: nobody can have planted in it
        atexit.register(shutil.rmtree, _PRIVATE_CACHE, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _PRIVATE_CACHE
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_PRIVATE_CACHE, "triton")
    for name in ("TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE",
                 "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE", "TORCHINDUCTOR_BUNDLED_AUTOTUNE_REMOTE_CACHE"):
        os.environ[name] = "0"
    return _PRIVATE_CACHE


def prepare_compile_cache(folder: str | None) -> tuple[str | None, str]:
    """(the cache folder to use or None, its status) for --compile-cache `folder`: checked and enabled; otherwise
    Inductor is pointed at this process's private folder (private_inductor_cache), whatever the environment (a Ray
    runtime_env, the operator's shell, Inductor's default /tmp/torchinductor_<user>, which another user can create
    first) said before. A refused folder (others could have written it) also prints one stderr line. Either way
    nothing in a folder the service did not check is ever read as compiled code."""
    import sys

    if not folder:
        private_inductor_cache()
        return None, "no cache"
    try:
        enable_compile_cache(folder)
        return folder, "enabled"
    except SccError as err:  # never load what someone else could have written: compile without the cache
        private = private_inductor_cache()
        print(f"scc serve: not using the compile cache: {err}; compiling in a fresh private folder instead",
              file=sys.stderr)
        log.info("compile cache refused; Inductor uses %s", private)
        return None, f"refused: {err}"


class Service:
    """One replica's model: a backend runner with every bucket warm, and the batch handler.

    `Service(service_config(model=..., defense=..., backend=...))`; `ready` once every bucket ran."""

    def __init__(self, cfg: Mapping, warm: bool = True):
        cfg = service_config(cfg)
        self.cfg = cfg
        torch.set_num_threads(cfg["threads"])
        cache, status = prepare_compile_cache(cfg["compile_cache"])
        self.artifacts_status = "no cache" if cache else status  # a usable cache: the artifact's own status below
        start = time.perf_counter()
        self.classifier = load(cfg["model"], cfg["pretrained"], labels=cfg["labels"], templates=cfg["templates"],
                               device=cfg["device"])
        self.limits = limits_of(cfg, self.classifier.image_size)
        name, preset = split_spec(cfg["defense"])
        self.dtype = resolve_dtype(cfg["dtype"], cfg["device"])
        self.defended = defend(self.classifier, name, preset=preset, seed=cfg["seed"])
        self.defended.validate = False  # decoded pixels are in [0,1] by construction
        self.max_batch = cfg["max_batch"]
        self.backend = cfg["backend"]
        if self.backend == "onnx":
            self.buckets = [self.max_batch]  # one fixed-batch file
        else:
            self.buckets = power_of_two_buckets(self.max_batch)
        self.artifacts = None  # the compile-cache artifact file of this exact replica (compiled/triton with a cache)
        self.mac_key = None
        if cache and self.backend in ("compiled", "triton"):
            self.artifact_key = self.cache_key(dtype_name(self.dtype))
            self.artifacts = artifact_path(cache, self.artifact_key)
            self.mac_key = cache_mac_key(cache, cfg["cache_key_file"])
            self.artifacts_status = load_compile_artifacts(self.artifacts, self.mac_key)
        # Inductor's FX graph cache skips frozen graphs (their weights are constants), so a compiled replica with a
        # compile cache runs unfrozen: nothing would be saved for the next replica otherwise
        freeze = False if self.artifacts else None
        self.runner = make_runner(self.defended, cfg["backend"], batch_size=self.max_batch, dtype=self.dtype,
                                  freeze=freeze)
        self.pad = self.backend != "eager"  # eager runs any batch size as it is
        self.load_seconds = time.perf_counter() - start
        self.bucket_seconds: dict[int, float] = {}
        self.ready = False
        self.info_static = {
            "model": cfg["model"], "pretrained": cfg["pretrained"], "labels": list(self.classifier.labels),
            "image_size": self.classifier.image_size, "preprocess": self.classifier.preprocess.to_dict(),
            "defense": self.defended.defense, "spec": self.defended.spec,
            "config": _jsonable(self.defended.config), "backend": self.backend, "dtype": dtype_name(self.dtype),
            "device": cfg["device"], "buckets": self.buckets, "max_batch": self.max_batch,
            "batch_wait_ms": cfg["batch_wait_ms"], "seed": "secret" if cfg["seed"] is None else cfg["seed"],
            "threads": cfg["threads"], "draws": "replay" if cfg["replay_draws"] else "fresh",
            "client_seeds": cfg["replay_draws"],
            "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_pixels": self.limits.max_pixels,
                       "max_request_pixels": self.limits.max_request_pixels, "max_images": self.limits.max_images,
                       "max_aspect": self.limits.max_aspect, "image_formats": list(self.limits.formats),
                       "max_queue": cfg["max_queue"], "timeout_s": cfg["timeout_s"],
                       "body_timeout_s": cfg["body_timeout_s"], "header_timeout_s": cfg["header_timeout_s"],
                       "max_client_requests": cfg["max_client_requests"]},
        }
        self.stats = {"batches": 0, "images": 0, "errors": 0}
        if warm:
            self.warm_up()

    @property
    def artifacts_loaded(self) -> bool:
        return self.artifacts_status == "loaded"

    def warm_up(self) -> None:
        """Compile (compiled/triton) and run every bucket once: the first request pays nothing.
        `bucket_seconds[b]`: bucket b's compile + first call (the largest bucket's compile is in load_seconds)."""
        s = self.classifier.image_size
        gen = torch.Generator().manual_seed(0)
        for b in self.buckets:
            x = torch.rand(b, 3, s, s, generator=gen)
            items = [Item(name=f"warmup{i}", x=x[i], seed=0, key=i) for i in range(b)]
            start = time.perf_counter()
            if self.runner.warmup is not None:  # compiled/triton: this bucket's graph (the largest is built)
                self.runner.warmup(b)
            self.handle_batch(items, count=False)
            self.bucket_seconds[b] = time.perf_counter() - start
        if self.artifacts is not None and not self.artifacts_loaded:
            save_compile_artifacts(self.artifacts, self.artifact_key, self.mac_key)
        self.ready = True

    def cache_key(self, dtype: str) -> dict:
        """What a compiled replica's graphs depend on: model, defense and its config, buckets, dtype, device,
        backend and versions. Its hash names the artifact file, so a change of any of them is a miss."""
        cfg = self.cfg
        return {"model": cfg["model"], "pretrained": cfg["pretrained"], "labels": list(self.classifier.labels),
                "templates": cfg["templates"], "spec": self.defended.spec,
                "config": _jsonable(self.defended.config), "backend": self.backend, "dtype": dtype,
                "device": cfg["device"], "buckets": self.buckets, "versions": versions()}

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n) if self.pad else n

    def info(self) -> dict:
        """What /v1/info shows of this replica: no pid and no path (the artifact file by its name only; a refusal's
        reason, which names folders, stays in the log)."""
        status = self.artifacts_status.split(":", 1)[0]
        return {**self.info_static, "ready": self.ready, "load_s": round(self.load_seconds, 3),
                "compile_artifacts": os.path.basename(self.artifacts) if self.artifacts else None,
                "compile_artifacts_loaded": self.artifacts_loaded, "compile_artifacts_status": status,
                "bucket_warm_s": {str(b): round(t, 3) for b, t in self.bucket_seconds.items()},
                "compile_s": self.runner.compile_seconds, "stats": dict(self.stats),
                "replica": replica_memory(), "versions": versions()}

    def seed_of(self, item: Item) -> int:
        """The draws seed of one image: the client's (replay), a fresh one from the request's nonce, or the secret."""
        if item.seed is not None:
            return item.seed
        if item.nonce is not None:
            return derive_seed(self.defended._secret, "fresh:" + item.nonce)
        return self.defended._secret

    def draws_for(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Row b's draws from (seed_of(item), item key): one generator per image."""
        d = self.defended
        per = [d.record.keyed_draws(it.x[None], d.config, self.seed_of(it), [it.key]) for it in items]
        return {k: torch.cat([p[k] for p in per]) for k in per[0]} if per and per[0] else {}

    def undefended(self, items: Sequence[Item]) -> list[dict]:
        """The same images through the undefended classifier (the operator page shows it beside the defended
        answer): {"label", "index", "scores" (top-k), "compute_ms"} per image, or {"error"} for an unusable one."""
        good = [it for it in items if it.error is None and it.x is not None]
        if not good:
            return [{"error": it.error or "no image"} for it in items]
        started = time.perf_counter()
        with torch.no_grad():
            probs = self.classifier(torch.stack([it.x for it in good]).to(self.classifier.text.device)).float() \
                .softmax(-1).cpu()
        compute_ms = round((time.perf_counter() - started) * 1e3, 3)
        labels, rows, out = self.classifier.labels, iter(probs), []
        for it in items:
            if it.error is not None or it.x is None:
                out.append({"error": it.error or "no image"})
                continue
            p = next(rows)
            top = p.topk(min(it.top_k or self.cfg["top_k"], len(labels)))
            out.append({"label": labels[top.indices[0]], "index": int(top.indices[0]),
                        "scores": {labels[j]: round(float(v), 6) for v, j in zip(top.values, top.indices)},
                        "compute_ms": compute_ms})
        return out

    def handle_batch(self, items: Sequence[Item], count: bool = True) -> list[dict]:
        """Items -> one result dict per item, in order: {"label", "index", "scores", "key", ...} or {"error"}.

        Items without a key get a fresh uuid4 key. The good items run in chunks of max_batch, each padded to its
        bucket (repeating its last row, sliced off after); an item that failed earlier keeps its error."""
        started = time.perf_counter()
        results: list[dict | None] = [None] * len(items)
        good = []
        for i, it in enumerate(items):
            if it.error is not None or it.x is None:
                results[i] = {"name": it.name, "error": it.error or "no image", "error_kind": it.error_kind or "decode"}
            else:
                if it.key is None:
                    it.key = uuid.uuid4().hex
                good.append(i)
        if good:
            try:
                x = torch.stack([items[i].x for i in good]).to(self.classifier.text.device)
                draws = self.draws_for([items[i] for i in good])
                names = list(draws)
                outs = []
                with torch.no_grad():
                    for _, n, rows in padded_chunks([x, *(draws[k] for k in names)], self.max_batch, self.bucket_for):
                        outs.append(self.runner(rows[0], dict(zip(names, rows[1:])))[:n].float().cpu())
                probs = torch.cat(outs).softmax(-1)
            except Exception:  # an engine failure answers every item of the batch, never kills the replica
                rid = secrets.token_hex(6)
                log.exception("internal error %s in the engine (batch of %d)", rid, len(good))
                for i in good:
                    results[i] = {"name": items[i].name, "error": f"internal error (request {rid}); the server log "
                                                                  "has the details", "error_kind": "internal"}
                good, probs = [], None
            compute_ms = (time.perf_counter() - started) * 1e3
            labels = self.classifier.labels
            for row, i in enumerate(good):
                it = items[i]
                k = min(it.top_k or self.cfg["top_k"], len(labels))
                top = probs[row].topk(k)
                res = {"name": it.name, "label": labels[top.indices[0]], "index": int(top.indices[0]),
                       "scores": {labels[j]: round(float(v), 6) for v, j in zip(top.values, top.indices)},
                       "key": it.key, "batch_size": len(good),
                       "queue_ms": round((started - it.enqueued) * 1e3, 3), "compute_ms": round(compute_ms, 3)}
                if it.seed is not None:
                    res["seed"] = it.seed
                results[i] = res
        if count:
            self.stats["batches"] += 1
            self.stats["images"] += len(good)
            self.stats["errors"] += len(items) - len(good)
        return results  # type: ignore[return-value]


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def refusal(item: Item, kind: str, message: str) -> dict:
    """The result of an image that never reached the engine (kind: overloaded | deadline | cancelled)."""
    return {"name": item.name, "error": message, "error_kind": kind}


class EngineQueue:
    """Bounded continuous batching in front of one engine: `await queue.submit(items)` -> their results.

    Submitted items wait in one FIFO of at most `max_queue` images; one drain task runs the engine (in a worker
    thread, so the event loop keeps serving) on up to max_batch pending items at a time, whoever submitted them,
    waiting up to `batch_wait_ms` for a fuller batch only when fewer are pending. A submit that would overflow the
    queue is answered at once ("overloaded"); an item whose deadline (time.monotonic()) passed while it waited is
    dropped before compute ("deadline"); a cancelled submit (the client went away) takes its items out of the queue.
    `counts` records each of these."""

    def __init__(self, handle_batch, max_batch: int, max_queue: int | None = None, batch_wait_ms: float = 0.0,
                 on_batch=None):
        self.handle_batch, self.max_batch, self.on_batch = handle_batch, max_batch, on_batch
        self.max_queue = max_queue or 8 * max_batch
        self.batch_wait_s = batch_wait_ms / 1e3
        self.pending: list[tuple[Item, asyncio.Future]] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scc-engine")
        self.drainer: asyncio.Task | None = None
        self.more = None  # an asyncio.Event set when items arrive (created on the running loop)
        self.counts = {"overloaded": 0, "deadline": 0, "cancelled": 0, "computed": 0}

    async def submit(self, items: Sequence[Item]) -> list[dict]:
        loop = asyncio.get_running_loop()
        if len(self.pending) + len(items) > self.max_queue:
            self.counts["overloaded"] += len(items)
            msg = (f"overloaded: {len(self.pending)} images queued, a limit of {self.max_queue}; retry after the "
                   "Retry-After delay")
            return [refusal(it, "overloaded", msg) for it in items]
        futures = []
        for it in items:
            futures.append(loop.create_future())
            self.pending.append((it, futures[-1]))
        if self.more is None:
            self.more = asyncio.Event()
        self.more.set()
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.ensure_future(self._drain())
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            mine = {id(f) for f in futures}
            before = len(self.pending)
            self.pending = [(it, f) for it, f in self.pending if id(f) not in mine]
            self.counts["cancelled"] += before - len(self.pending)
            raise

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            if len(self.pending) < self.max_batch and self.batch_wait_s > 0:
                self.more.clear()
                try:
                    await asyncio.wait_for(self.more.wait(), self.batch_wait_s)
                except asyncio.TimeoutError:
                    pass
            take, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
            now = time.monotonic()
            live = []
            for it, f in take:
                if f.done():  # its submit was cancelled after the batch was taken
                    continue
                if it.deadline is not None and now > it.deadline:
                    self.counts["deadline"] += 1
                    f.set_result(refusal(it, "deadline", "the request's deadline passed while it was queued; "
                                                         "retry after the Retry-After delay"))
                else:
                    live.append((it, f))
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.pool, self.handle_batch, [it for it, _ in live])
            except Exception:  # handle_batch answers per item; this is a last resort
                rid = secrets.token_hex(6)
                log.exception("internal error %s in the batch handler", rid)
                results = [{"name": it.name, "error": f"internal error (request {rid}); the server log has the "
                                                      "details", "error_kind": "internal"} for it, _ in live]
            self.counts["computed"] += len(live)
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)
            if self.on_batch is not None:
                self.on_batch(results)

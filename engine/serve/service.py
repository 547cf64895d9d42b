"""What one `scc serve` replica owns, plain Python tested without Ray: the backend runner with every bucket warm,
the batch handler and the continuous-batching queue in front of it.

    service = Service(service_config(model="scc-tiny-digits", defense="scc", backend="compiled"))
    results = service.handle_batch(items)          # Items -> result dicts, in order; a bad item never fails others
    queue = EngineQueue(service.handle_batch, max_batch=8); await queue.submit(items)

Randomness: image b's draws are a function of (seed, key) only (scc.draws.keyed_draws). The service's seed is a
fresh secret unless `seed` is set; an item's own seed is only honoured where the server allows client seeds.
"""
import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import torch

from ..backends import make_runner
from ..backends.artifacts import artifact_path, enable_compile_cache, load_compile_artifacts, save_compile_artifacts
from ..batching import padded_chunks, power_of_two_buckets
from ..defenses import defend, split_label
from ..errors import SccError
from ..models import TINY_NAME, load
from ..precision import dtype_name, resolve_dtype
from ..provenance import versions
from .requests import Item, set_pixel_limit

DEFAULTS = {
    "model": TINY_NAME, "pretrained": None, "labels": None, "templates": None, "defense": "scc",
    "backend": "eager", "dtype": "auto", "device": "cpu", "max_batch": 8, "batch_wait_ms": 5.0, "seed": None,
    "threads": 1, "top_k": 5, "max_body_bytes": 16 * 2 ** 20, "max_pixels": 40_000_000, "max_images": 64,
    "timeout_s": 30.0, "replicas": 1, "min_replicas": None, "max_replicas": None, "target_ongoing": None,
    "max_ongoing": None, "compile_cache": None, "client_seeds": False,
}


def service_config(args: Mapping | None = None, **overrides) -> dict:
    """DEFAULTS updated by `args` (a build_app/`serve deploy` args dict, strings allowed) and overrides, typed."""
    cfg = {**DEFAULTS, **(args or {}), **overrides}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise SccError(f"unknown serve setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    ints = ("max_batch", "threads", "top_k", "max_body_bytes", "max_pixels", "max_images", "replicas", "min_replicas",
            "max_replicas", "max_ongoing", "seed")
    for k in ints:
        if cfg[k] is not None and cfg[k] != "":
            try:
                cfg[k] = int(cfg[k])
            except (TypeError, ValueError):
                raise SccError(f"serve setting {k} must be an integer, got {cfg[k]!r}") from None
        else:
            cfg[k] = None if k in ("seed", "min_replicas", "max_replicas", "max_ongoing") else DEFAULTS[k]
    for k in ("batch_wait_ms", "timeout_s", "target_ongoing"):
        if cfg[k] is not None:
            cfg[k] = float(cfg[k])
    if isinstance(cfg["client_seeds"], str):  # a `serve deploy` YAML may hold strings
        if cfg["client_seeds"].strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SccError(f"serve setting client_seeds must be true or false, got {cfg['client_seeds']!r}")
        cfg["client_seeds"] = cfg["client_seeds"].strip().lower() in ("true", "1", "yes")
    cfg["client_seeds"] = bool(cfg["client_seeds"])
    for k in ("labels", "templates"):
        if isinstance(cfg[k], str):
            cfg[k] = [t.strip() for t in cfg[k].split("|" if k == "templates" else ",")]
    if cfg["max_batch"] < 1 or cfg["threads"] < 1 or cfg["replicas"] < 1:
        raise SccError("max_batch, threads and replicas must be positive integers")
    return cfg


class Service:
    """One replica's model: a backend runner with every bucket warm, and the batch handler.

    `Service(service_config(model=..., defense=..., backend=...))`; `ready` once every bucket ran."""

    def __init__(self, cfg: Mapping, warm: bool = True):
        cfg = service_config(cfg)
        self.cfg = cfg
        torch.set_num_threads(cfg["threads"])
        set_pixel_limit(cfg["max_pixels"])
        if cfg["compile_cache"]:
            enable_compile_cache(cfg["compile_cache"])
        start = time.perf_counter()
        self.classifier = load(cfg["model"], cfg["pretrained"], labels=cfg["labels"], templates=cfg["templates"],
                               device=cfg["device"])
        name, preset = split_label(cfg["defense"])
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
        self.artifacts_loaded = False
        if cfg["compile_cache"] and self.backend in ("compiled", "triton"):
            self.artifact_key = self.cache_key(dtype_name(self.dtype))
            self.artifacts = artifact_path(cfg["compile_cache"], self.artifact_key)
            self.artifacts_loaded = load_compile_artifacts(self.artifacts)
        self.runner = make_runner(self.defended, cfg["backend"], batch_size=self.max_batch, dtype=self.dtype)
        self.pad = self.backend != "eager"  # eager runs any batch size as it is
        self.load_seconds = time.perf_counter() - start
        self.bucket_seconds: dict[int, float] = {}
        self.ready = False
        self.info_static = {
            "model": cfg["model"], "pretrained": cfg["pretrained"], "labels": list(self.classifier.labels),
            "image_size": self.classifier.image_size, "defense": self.defended.label,
            "config": _jsonable(self.defended.config), "backend": self.backend, "dtype": dtype_name(self.dtype),
            "device": cfg["device"], "buckets": self.buckets, "max_batch": self.max_batch,
            "batch_wait_ms": cfg["batch_wait_ms"], "seed": "secret" if cfg["seed"] is None else cfg["seed"],
            "threads": cfg["threads"], "client_seeds": cfg["client_seeds"],
            "limits": {k: cfg[k] for k in ("max_body_bytes", "max_pixels", "max_images", "timeout_s")},
        }
        self.stats = {"batches": 0, "images": 0, "errors": 0}
        if warm:
            self.warm_up()

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
            save_compile_artifacts(self.artifacts, self.artifact_key)
        self.ready = True

    def cache_key(self, dtype: str) -> dict:
        """What a compiled replica's graphs depend on: model, defense and its config, buckets, dtype, device,
        backend and versions. Its hash names the artifact file, so a change of any of them is a miss."""
        cfg = self.cfg
        return {"model": cfg["model"], "pretrained": cfg["pretrained"], "labels": list(self.classifier.labels),
                "templates": cfg["templates"], "defense": self.defended.label,
                "config": _jsonable(self.defended.config), "backend": self.backend, "dtype": dtype,
                "device": cfg["device"], "buckets": self.buckets, "versions": versions()}

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n) if self.pad else n

    def info(self) -> dict:
        return {**self.info_static, "ready": self.ready, "load_seconds": round(self.load_seconds, 3),
                "compile_artifacts": self.artifacts, "compile_artifacts_loaded": self.artifacts_loaded,
                "bucket_warm_seconds": {str(b): round(t, 3) for b, t in self.bucket_seconds.items()},
                "compile_seconds": self.runner.compile_seconds, "stats": dict(self.stats), "versions": versions()}

    def draws_for(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Row b's draws from (item seed or the service's secret, item key): one generator per image."""
        d = self.defended
        per = [d.record.keyed_draws(it.x[None], d.config, d._secret if it.seed is None else it.seed, [it.key])
               for it in items]
        return {k: torch.cat([p[k] for p in per]) for k in per[0]} if per and per[0] else {}

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
            except Exception as err:  # an engine failure answers every item of the batch, never kills the replica
                for i in good:
                    results[i] = {"name": items[i].name, "error": f"internal error: {type(err).__name__}: {err}",
                                  "error_kind": "internal"}
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


class EngineQueue:
    """Continuous batching in front of one engine: `await queue.submit(items)` -> their results.

    Submitted items wait in one FIFO; one engine call runs at a time (in a worker thread, so the event loop keeps
    serving HTTP), and each call takes up to max_batch pending items, whoever submitted them. Every submit makes
    one call after its own items are queued, and the lock is FIFO, so a submit of <= max_batch items is always
    answered by its own call at the latest."""

    def __init__(self, handle_batch, max_batch: int, on_batch=None):
        self.handle_batch, self.max_batch, self.on_batch = handle_batch, max_batch, on_batch
        self.pending: list[tuple[Item, asyncio.Future]] = []
        self.lock = asyncio.Lock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scc-engine")

    async def submit(self, items: Sequence[Item]) -> list[dict]:
        loop = asyncio.get_running_loop()
        futures = []
        for it in items:
            futures.append(loop.create_future())
            self.pending.append((it, futures[-1]))
        while any(not f.done() for f in futures):
            async with self.lock:
                take, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                if not take:
                    continue
                try:
                    results = await loop.run_in_executor(self.pool, self.handle_batch, [it for it, _ in take])
                except Exception as err:  # handle_batch answers per item; this is a last resort
                    results = [{"name": it.name, "error": f"internal error: {type(err).__name__}: {err}",
                                "error_kind": "internal"} for it, _ in take]
                for (_, f), r in zip(take, results):
                    if not f.done():
                        f.set_result(r)
                if self.on_batch is not None:
                    self.on_batch(results)
        return [f.result() for f in futures]

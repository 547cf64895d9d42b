"""`scc serve`: the defended model as an HTTP service on Ray Serve.

    pip install -e '.[serve]'
    scc serve --model scc-tiny-digits --defense scc --backend compiled --replicas 2 --port 8000
    curl -s -X POST --data-binary @seven.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/v1/classify?key=7'

Layers (the first two are plain Python, tested without Ray):
    parse_request(...)       HTTP body + query -> `Item`s (one per image; a part that cannot be decoded is an Item
                             with its error, a request with nothing readable a `RequestError` = 4xx)
    Service.handle_batch     Items -> results, in order: per-image draws from (seed, key), pad to the engine's
                             bucket, one runner call per chunk, slice, top-k; a bad item never fails the others
    build_app(args)          the Ray Serve application (FastAPI ingress + @serve.batch), also the `import_path`
                             of `scc serve --print-config` (`serve deploy`)
    main(argv)               the CLI: local Ray (or --address), serve until Ctrl-C, clean shutdown

Randomness: image b's draws are a function of (seed, key) only (scc.draws.keyed_draws). The service's seed is a
fresh secret unless --seed. A request may pass `key`, and `seed` only where the server was started with
--client-seeds (off by default: whoever picks the seed knows the draws; such requests get 403); then the answer
equals `scc.defend(clf, defense, seed=seed)(x, keys=[key])` on the eager module, whatever batch it was served in.
Keys that are decimal integers are ints (as a dataset index), any other key is a string. Images without a key get
a fresh uuid4 key under the service's seed.
"""
import argparse
import asyncio
import io
import json
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import torch

from .models import SccError, TINY_NAME

DEFAULTS = {
    "model": TINY_NAME, "pretrained": None, "labels": None, "templates": None, "defense": "scc",
    "backend": "eager", "dtype": "auto", "device": "cpu", "max_batch": 8, "batch_wait_ms": 5.0, "seed": None,
    "threads": 1, "top_k": 5, "max_body_bytes": 16 * 2 ** 20, "max_pixels": 40_000_000, "max_images": 64,
    "timeout_s": 30.0, "replicas": 1, "min_replicas": None, "max_replicas": None, "target_ongoing": None,
    "max_ongoing": None, "compile_cache": None, "client_seeds": False,
}
IMAGE_FIELD = "image"


class RequestError(SccError):
    """A request the service refuses: `status` (4xx/5xx) and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Item:
    """One image of a request, on its way to a batch."""
    name: str  # "body" or the multipart part's filename / "image[i]"
    x: torch.Tensor | None = None  # (3, S, S) in [0,1]
    seed: int | None = None  # the request's seed (None: the service's)
    key: Hashable | None = None  # the request's key (None: a fresh uuid)
    top_k: int | None = None
    error: str | None = None
    error_kind: str | None = None
    enqueued: float = field(default_factory=time.perf_counter)


# ----------------------------------------------------------------------------------------------------------
# Request parsing (plain functions)
# ----------------------------------------------------------------------------------------------------------
def set_pixel_limit(max_pixels: int) -> None:
    """PIL's decompression-bomb limit, set explicitly: Image.open warns above it and raises above twice it; we
    refuse anything above it before decoding (decode_image)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = int(max_pixels)


def decode_image(data: bytes, size: int, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) in [0,1] (scc.data's preprocessing); RequestError when unusable."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from .data import pil_to_tensor, resize_center_crop

    if not data:
        raise RequestError(400, f"{name}: empty image")
    set_pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size  # from the header: nothing decoded yet
                if w * h > max_pixels:
                    raise RequestError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
                if w < 1 or h < 1:
                    raise RequestError(400, f"{name}: empty image ({w}x{h})")
                img.load()
                x = pil_to_tensor(img)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(413, f"{name}: image exceeds the limit of {max_pixels} pixels (PIL: {err})") from err
    except UnidentifiedImageError as err:
        raise RequestError(400, f"{name}: not a readable image (unknown or corrupt image format)") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(400, f"{name}: not a readable image ({type(err).__name__}: {err})") from err
    return resize_center_crop(x[None], size)[0]


def parse_key(text: str) -> Hashable:
    """A key from a query string: decimal integers are ints (like a dataset index), anything else a string."""
    text = text.strip()
    if not text or len(text) > 200:
        raise RequestError(400, f"key must be 1-200 characters, got {len(text)}")
    return int(text) if re.fullmatch(r"-?\d{1,18}", text) else text


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name) or []
    if len(values) > 1:
        raise RequestError(400, f"query parameter {name!r} given {len(values)} times, expected once")
    return values[0] if values else None


def _int_query(query: Mapping[str, Sequence[str]], name: str, lo: int, hi: int, shown: str) -> int | None:
    """The integer query parameter `name` in lo..hi (None when absent), or a 400 naming it."""
    value = _one(query, name)
    if value is None:
        return None
    try:
        value = int(value)
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {value!r}") from None
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must lie in {shown}, got {value}")
    return value


def parse_query(query: Mapping[str, Sequence[str]], max_top_k: int,
                client_seeds: bool = True) -> tuple[int | None, list | None, int | None]:
    """(seed, keys or None, top_k) from the query parameters (each name -> its list of values). A `seed` is
    refused (403) unless the server lets clients choose seeds: whoever picks the seed knows every draw."""
    if query.get("seed") and not client_seeds:
        raise RequestError(403, "this server keeps its draws secret and refuses client-chosen seeds (a known seed "
                                "is a known-draws attack); drop ?seed=, or start it with --client-seeds for "
                                "reproducible answers")
    seed = _int_query(query, "seed", 0, 2 ** 63 - 1, "[0, 2**63)")
    keys = None
    if query.get("key"):
        keys = [parse_key(k) for v in query["key"] for k in v.split(",")]
    top_k = _int_query(query, "top_k", 1, max_top_k, f"1..{max_top_k}")
    return seed, keys, top_k


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """multipart/form-data -> [(field name, filename, bytes)] with the standard library's MIME parser."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if "boundary=" not in content_type:
        raise RequestError(400, "multipart body without a boundary in its Content-Type")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError(400, "malformed multipart body")
    parts = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        parts.append((name or "", part.get_filename(), payload if isinstance(payload, bytes) else b""))
    return parts


def parse_request(content_type: str | None, body: bytes, query: Mapping[str, Sequence[str]], size: int,
                  max_pixels: int, max_body_bytes: int, max_images: int = 64, max_top_k: int = 1000,
                  client_seeds: bool = True) -> list[Item]:
    """An HTTP request -> its Items (one per image, in order). RequestError (4xx) when the request as a whole is
    unusable: too large, no body, an unsupported type, bad query, or not one readable image."""
    if len(body) > max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    if not body:
        raise RequestError(400, "empty body: send one image (Content-Type image/*) or a multipart form with "
                                f"'{IMAGE_FIELD}' parts")
    seed, keys, top_k = parse_query(query, max_top_k, client_seeds)
    ctype = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parts = [(filename or f"{IMAGE_FIELD}[{i}]", data)
                 for i, (name, filename, data) in enumerate(p for p in parse_multipart(content_type, body)
                                                            if p[0] == IMAGE_FIELD)]
        if not parts:
            raise RequestError(400, f"multipart body has no '{IMAGE_FIELD}' part")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        parts = [("body", body)]
    else:
        raise RequestError(415, f"unsupported Content-Type {ctype!r}: send image/*, application/octet-stream or "
                                "multipart/form-data")
    if len(parts) > max_images:
        raise RequestError(413, f"{len(parts)} images in one request exceed the limit of {max_images}")
    if keys is not None and len(keys) != len(parts):
        raise RequestError(400, f"key: one per image, got {len(keys)} keys for {len(parts)} images")
    items = []
    for i, (name, data) in enumerate(parts):
        item = Item(name=name, seed=seed, key=None if keys is None else keys[i], top_k=top_k)
        try:
            item.x = decode_image(data, size, max_pixels, name)
        except RequestError as err:
            item.error, item.error_kind = str(err), "decode" if err.status == 400 else "too_large"
            if len(parts) == 1:
                raise
        items.append(item)
    if all(it.error for it in items):
        raise RequestError(400, "no readable image: " + "; ".join(it.error for it in items))
    return items


# ----------------------------------------------------------------------------------------------------------
# The service (plain Python: what one replica owns)
# ----------------------------------------------------------------------------------------------------------
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
        from . import defend, load
        from .backends import dtype_name, make_runner, resolve_dtype
        from .defenses import split_defense_name
        from .plumbing import power_of_two_buckets

        cfg = service_config(cfg)
        self.cfg = cfg
        torch.set_num_threads(cfg["threads"])
        set_pixel_limit(cfg["max_pixels"])
        if cfg["compile_cache"]:
            enable_compile_cache(cfg["compile_cache"])
        start = time.perf_counter()
        self.classifier = load(cfg["model"], cfg["pretrained"], labels=cfg["labels"], templates=cfg["templates"],
                               device=cfg["device"])
        name, preset = split_defense_name(cfg["defense"])
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
        from .env import versions

        cfg = self.cfg
        return {"model": cfg["model"], "pretrained": cfg["pretrained"], "labels": list(self.classifier.labels),
                "templates": cfg["templates"], "defense": self.defended.label,
                "config": _jsonable(self.defended.config), "backend": self.backend, "dtype": dtype,
                "device": cfg["device"], "buckets": self.buckets, "versions": versions()}

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n) if self.pad else n

    def info(self) -> dict:
        from .env import versions

        return {**self.info_static, "ready": self.ready, "load_seconds": round(self.load_seconds, 3),
                "compile_artifacts": self.artifacts, "compile_artifacts_loaded": self.artifacts_loaded,
                "bucket_warm_seconds": {str(b): round(t, 3) for b, t in self.bucket_seconds.items()},
                "compile_seconds": self.runner.compile_seconds, "stats": dict(self.stats), "versions": versions()}

    def draws_for(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Row b's draws from (item seed or the service's secret, item key): one generator per image."""
        d = self.defended
        per = [d.spec.keyed_draws(it.x[None], d.config, d._secret if it.seed is None else it.seed, [it.key])
               for it in items]
        return {k: torch.cat([p[k] for p in per]) for k in per[0]} if per and per[0] else {}

    def handle_batch(self, items: Sequence[Item], count: bool = True) -> list[dict]:
        """Items -> one result dict per item, in order: {"label", "index", "scores", "key", ...} or {"error"}.

        Items without a key get a fresh uuid4 key. The good items run in chunks of max_batch, each padded to its
        bucket (repeating its last row, sliced off after); an item that failed earlier keeps its error."""
        from .plumbing import padded_chunks

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


def enable_compile_cache(folder: str) -> None:
    """Inductor's on-disk caches (FX graph, AOT autograd, compiled kernels) under `folder`, shared by every
    replica on the host. Inductor keys each entry by the graph, its input shapes (= the bucket), dtypes, device
    and the torch/triton versions, so one folder serves every model x defense x bucket safely."""
    import torch._inductor.config as inductor_config

    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(folder)  # read when a cache path is needed
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    inductor_config.fx_graph_cache = True  # the config module may have read the environment already
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = True


def artifact_path(folder: str, key: Mapping) -> str:
    """`folder/scc-<hash of key>.bin`: the artifact file of the replica that `key` describes."""
    import hashlib

    text = json.dumps(key, sort_keys=True, default=str)
    return os.path.join(folder, f"scc-{hashlib.blake2b(text.encode(), digest_size=12).hexdigest()}.bin")


def load_compile_artifacts(path: str) -> bool:
    """Preload torch's compile caches from one artifact file (torch.compiler.load_cache_artifacts): True when it
    existed and loaded. A replica on a host whose local caches are empty starts warm from this one file."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        blob = f.read()
    try:
        info = torch.compiler.load_cache_artifacts(blob)  # None when the bytes do not deserialize
        reason = None if info is not None else "not a torch compile-cache artifact (checksum or format)"
    except Exception as err:  # a truncated or foreign file must not stop the replica: it compiles instead
        reason = f"{type(err).__name__}: {err}"
    if reason is not None:
        print(f"scc serve: ignoring the compile-cache artifact {path} ({reason}); compiling from scratch",
              file=sys.stderr)
        return False
    return True


def save_compile_artifacts(path: str, key: Mapping) -> bool:
    """Write what this process compiled (torch.compiler.save_cache_artifacts) to `path`, atomically, and `key`
    beside it as `path.json` (what the file was built for)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for target, data in ((path + ".json", json.dumps(key, indent=2, sort_keys=True, default=str).encode()),
                         (path, saved[0])):
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return True


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


# ----------------------------------------------------------------------------------------------------------
# Ray Serve application
# ----------------------------------------------------------------------------------------------------------
def _deployment_class():
    """The Ray Serve deployment class (defined on demand: `import scc.serve` needs no Ray)."""
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
    """The Ray Serve application: `serve.run(build_app({...}))`, or `import_path: scc.serve:build_app` with `args`
    in a Serve config file (every value may be a string)."""
    cfg = service_config(args)
    return _deployment_class().options(**deployment_options(cfg)).bind(cfg)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scc serve", description="Serve a defended zero-shot classifier over HTTP "
                                "(Ray Serve). POST /v1/classify, GET /healthz, /readyz, /v1/info.")
    p.add_argument("--model", default=TINY_NAME, help="open_clip model name or %(default)s (default)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, checkpoint path, or none")
    p.add_argument("--labels", default=None, help="comma-separated class names (default for the bundled model: digits)")
    p.add_argument("--templates", default=None, help="'|'-separated prompt templates with {}")
    p.add_argument("--defense", default="scc", help="none | ttc | scc | scc-latency | rtpt (default: %(default)s)")
    p.add_argument("--backend", default="eager", choices=("eager", "compiled", "triton", "onnx"),
                   help="scc.backends runner each replica owns (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="the service's seed (default: a fresh secret per replica)")
    p.add_argument("--client-seeds", action="store_true",
                   help="let requests choose ?seed= (reproducible answers, e.g. for tests; whoever picks the seed "
                        "knows the draws, so leave it off in production: such requests get 403)")
    p.add_argument("--max-batch", type=int, default=8, help="largest engine bucket = @serve.batch max_batch_size")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="@serve.batch batch_wait_timeout_s in ms")
    p.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default: %(default)s)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling: minimum replicas")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: maximum replicas")
    p.add_argument("--target-ongoing", type=float, default=None, help="autoscaling target ongoing requests per replica")
    p.add_argument("--max-ongoing", type=int, default=None, help="max_ongoing_requests per replica (default: max(64, 2x --max-batch))")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per replica")
    p.add_argument("--top-k", type=int, default=5, help="scores returned per image unless ?top_k= (default: 5)")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (default: %(default)s MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest decoded image (PIL's bomb limit)")
    p.add_argument("--max-images", type=int, default=64, help="images per multipart request")
    p.add_argument("--timeout-s", type=float, default=30.0, help="request timeout in seconds")
    p.add_argument("--compile-cache", default=None, help="folder for Inductor's compile caches (compiled backend)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Ray's Prometheus endpoint port (local Ray; default: Ray picks one); metrics are ray_scc_*")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray://HOST:PORT or auto): deploy and exit")
    p.add_argument("--print-config", action="store_true", help="print the Ray Serve config YAML for `serve deploy`")
    return p


def args_to_config(a: argparse.Namespace) -> dict:
    return service_config(
        model=a.model, pretrained=a.pretrained, labels=a.labels, templates=a.templates, defense=a.defense,
        backend=a.backend, dtype=a.dtype, device=a.device, seed=a.seed, max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms, replicas=a.replicas, min_replicas=a.min_replicas,
        max_replicas=a.max_replicas, target_ongoing=a.target_ongoing, max_ongoing=a.max_ongoing, threads=a.threads,
        top_k=a.top_k, max_body_bytes=int(a.max_body_mb * 2 ** 20), max_pixels=a.max_pixels,
        max_images=a.max_images, timeout_s=a.timeout_s, compile_cache=a.compile_cache, client_seeds=a.client_seeds)


def serve_config_yaml(cfg: Mapping, host: str, port: int, timeout_s: float) -> str:
    """The Ray Serve config file equivalent to this command line (`serve deploy config.yaml`)."""
    args = {k: v for k, v in cfg.items() if v is not None and v != DEFAULTS.get(k)}
    doc = {"proxy_location": "EveryNode",
           "http_options": {"host": host, "port": port, "request_timeout_s": timeout_s},
           "applications": [{"name": "scc", "route_prefix": "/", "import_path": "scc.serve:build_app",
                             "args": args}]}
    try:
        import yaml

        return yaml.safe_dump(doc, sort_keys=False)
    except ImportError:  # JSON is YAML
        return json.dumps(doc, indent=2) + "\n"


def wait_ready(url: str, timeout: float = 120.0) -> float:
    """Poll GET url/readyz until 200 (bounded); returns the seconds waited."""
    import urllib.error
    import urllib.request

    start = time.perf_counter()
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.perf_counter() - start > timeout:
            raise SccError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = args_to_config(a)
    if a.print_config:
        sys.stdout.write(serve_config_yaml(cfg, a.host, a.port, a.timeout_s))
        return 0
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise SccError(f"scc serve needs Ray Serve: pip install -e '.[serve]' ({err})") from err
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    started = time.perf_counter()
    remote = a.address is not None
    if remote:
        ray.init(address=a.address)
    else:
        # the replicas' own thread count comes from --threads; Ray's processes stay off the terminal
        extra = {} if a.metrics_port is None else {"_metrics_export_port": a.metrics_port}
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg["threads"])}}, **extra)
    # after ray.init, which installs its own (aborting) SIGTERM handler: `kill PID` shuts down as cleanly as
    # Ctrl-C, also when a background shell started us with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        serve.start(http_options={"host": a.host, "port": a.port, "request_timeout_s": a.timeout_s + 5},
                    logging_config={"enable_access_log": False})
        print(f"scc serve: deploying {cfg['model']} {cfg['defense']} on {cfg['backend']} "
              f"({cfg['replicas']} replica(s), buckets up to {cfg['max_batch']})", flush=True)
        serve.run(build_app(cfg), name="scc", route_prefix="/", blocking=False)
        url = f"http://{a.host}:{a.port}"
        if remote:
            print(f"scc serve: deployed onto {a.address} (application 'scc'; HTTP per the cluster's proxy)", flush=True)
            return 0
        waited = wait_ready(url, timeout=600)
        print(f"scc serve: ready on {url} after {time.perf_counter() - started:.1f} s "
              f"(readyz {waited:.1f} s); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("scc serve: shutting down", flush=True)
        return 0
    finally:
        if not remote:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

"""The front door of `scc serve`, plain Python tested without Ray: one request in, one `Reply` out.

    front = Front(cfg, call_model, describe, replica_gone=lambda err: ...)
    reply = await front.classify(headers, query, body_chunks)      # Reply(status, {"results": ...} | {"error": ...})

What it guarantees, in order, for every request (each refusal is `{"error": "<one line>"}` with a 4xx/503):
  1. the bearer token (when the server has one): 401 without it; compared in constant time as SHA-256 digests, so
     the token itself never leaves the operator's machine and is never logged;
  2. admission: at most max_queue x replicas requests in flight, beyond that 503 + Retry-After before reading a byte;
  3. the body: Content-Length and the bytes read against max_body_bytes (413), all of it within body_timeout_s (408:
     a client that trickles its body cannot hold a slot for longer);
  4. parsing and decoding (scc.serve.requests: every budget checked from the headers before any pixel is decoded) in
     a small thread pool, never on the event loop, so a large image cannot hold up other clients' requests;
  5. the model call, bounded by the request's deadline (timeout_s from arrival): a replica that dies under the call
     (SIGKILL, OOM) is retried on another one until the deadline, and a request that cannot be answered in time, or
     that finds the replicas' queues full, gets 503 + Retry-After; the deadline travels with the images, and a
     replica drops images whose deadline passed while they were queued, before computing them.
Randomness: without replay mode every request gets a fresh 128-bit nonce that the replica mixes into its secret seed
(scc.serve.service.Service.seed_of); the answer says which mode served it ("draws": "fresh" | "replay").
"""
import asyncio
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from ..images import Preprocess
from .requests import RequestError, _int_query, parse_parts, parse_query, parse_request
from .service import limits_of, replica_memory

RETRYABLE_KINDS = ("overloaded", "deadline")


@dataclass
class Reply:
    status: int
    body: dict
    headers: dict = field(default_factory=dict)


def error_reply(status: int, message: str, retry_after: int | None = None) -> Reply:
    """The service's one error shape: {"error": message} (+ Retry-After on a retryable 503)."""
    return Reply(status, {"error": message}, {"Retry-After": str(retry_after)} if retry_after is not None else {})


def token_digest(token: str) -> str:
    """What the server keeps of a bearer token: its SHA-256, hex."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


async def read_body(chunks: AsyncIterator[bytes], limit: int, timeout_s: float) -> bytes:
    """The whole body, at most `limit` bytes (413 beyond), within `timeout_s` (408 for a client that trickles)."""
    body = bytearray()

    async def read():
        async for chunk in chunks:
            body.extend(chunk)
            if len(body) > limit:
                raise RequestError(413, f"body exceeds the limit of {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s ({len(body)} bytes "
                                "received); send it at once") from None
    return bytes(body)


class Front:
    """The ingress of one `scc serve` application (see the module docstring).

    call_model(items, budget_s) -> list[dict]: the images to a model replica (results in order).
    describe() -> dict: a model replica's /v1/info. replica_gone(exc) -> bool: whether an exception of call_model
    means the replica died (retried until the deadline)."""

    def __init__(self, cfg: Mapping, call_model: Callable[..., Awaitable[list]], describe: Callable[[], Awaitable],
                 replica_gone: Callable[[BaseException], bool] = lambda err: False):
        self.cfg = cfg
        self.call_model, self.describe, self.replica_gone = call_model, describe, replica_gone
        self.pool = ThreadPoolExecutor(cfg["decode_threads"], thread_name_prefix="scc-decode")
        self.max_inflight = cfg["max_queue"] * max(cfg["replicas"], cfg["max_replicas"] or 0)
        self.inflight = 0
        self.digest = bytes.fromhex(cfg["token_sha256"]) if cfg["token_sha256"] else None
        self.model: dict | None = None  # the model replicas' static info, fetched on first use
        self.counts = {"requests": 0, "unauthorized": 0, "refused": 0, "overloaded": 0, "deadline": 0,
                       "replica_retries": 0, "ok": 0}

    # ------------------------------------------------------------------------------------------------------
    def authorized(self, authorization: str | None) -> bool:
        """Constant-time check of `Authorization: Bearer <token>` (always true without a server token)."""
        if self.digest is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(presented, self.digest) and scheme.lower() == "bearer"

    def retry_later(self, message: str, kind: str) -> Reply:
        self.counts[kind] += 1
        return error_reply(503, message, self.cfg["retry_after_s"])

    async def static_info(self) -> dict:
        if self.model is None:
            info = await self.describe()
            self.model = {k: info[k] for k in ("model", "defense", "backend", "image_size", "labels")}
            self.model["spec"] = info.get("spec", info["defense"])
            self.model["preprocess"] = Preprocess.from_dict(info["preprocess"])  # the replica's model's own
        return self.model

    async def info(self) -> dict:
        """A model replica's /v1/info, with what the front door knows (mode, auth, in-flight requests, counts)."""
        info = dict(await self.describe())
        info["ingress"] = {**replica_memory(), "inflight": self.inflight, "max_inflight": self.max_inflight,
                           "counts": dict(self.counts), "auth": "bearer" if self.digest else "none"}
        return info

    # ------------------------------------------------------------------------------------------------------
    async def classify(self, headers: Mapping[str, str], query: Mapping[str, Sequence[str]],
                       body: AsyncIterator[bytes]) -> Reply:
        """An HTTP POST /v1/classify (headers: case-insensitive mapping)."""
        start = time.monotonic()
        limit = self.cfg["max_body_bytes"]
        length = headers.get("content-length")

        def parse(data: bytes, preprocess: Preprocess, limits):
            return parse_request(headers.get("content-type"), data, query, preprocess, limits, self.cfg["replay_draws"])

        try:  # a client may ask for a shorter deadline than the server's (?timeout_ms=)
            budget = _int_query(query, "timeout_ms", 1, int(self.cfg["timeout_s"] * 1000),
                                f"1..{int(self.cfg['timeout_s'] * 1000)} (the server's --timeout-s)")
        except RequestError as err:
            return error_reply(err.status, str(err))

        async def body_then_parse(preprocess: Preprocess, limits):
            if length is not None and length.strip().isdigit() and int(length) > limit:
                raise RequestError(413, f"body of {length.strip()} bytes exceeds the limit of {limit}")
            data = await read_body(body, limit, self.cfg["body_timeout_s"])
            return await asyncio.get_running_loop().run_in_executor(self.pool, parse, data, preprocess, limits)

        return await self._serve(start, headers.get("authorization"), body_then_parse,
                                 None if budget is None else budget / 1e3)

    async def classify_parts(self, authorization: str | None, parts: Sequence[tuple[str, bytes]],
                             query: Mapping[str, Sequence[str]]) -> Reply:
        """The gRPC Classify call: images already split into parts, keys/top_k/seed as query values."""
        start = time.monotonic()

        def parse(preprocess: Preprocess, limits):
            seed, keys, top_k = parse_query(query, limits.max_top_k, self.cfg["replay_draws"], limits.max_images)
            return parse_parts(parts, preprocess, limits, seed, keys, top_k)

        async def run_parse(preprocess: Preprocess, limits):
            if sum(len(d) for _, d in parts) > self.cfg["max_body_bytes"]:
                raise RequestError(413, f"images exceed the limit of {self.cfg['max_body_bytes']} bytes")
            return await asyncio.get_running_loop().run_in_executor(self.pool, parse, preprocess, limits)

        return await self._serve(start, authorization, run_parse)

    async def _serve(self, start: float, authorization: str | None, get_items, budget_s: float | None = None) -> Reply:
        self.counts["requests"] += 1
        if not self.authorized(authorization):
            self.counts["unauthorized"] += 1
            reply = error_reply(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
            reply.headers["WWW-Authenticate"] = 'Bearer realm="scc"'
            return reply
        if self.inflight >= self.max_inflight:
            return self.retry_later(f"overloaded: {self.inflight} requests in flight, a limit of "
                                    f"{self.max_inflight}; retry after the Retry-After delay", "overloaded")
        self.inflight += 1
        try:
            deadline = start + (budget_s or self.cfg["timeout_s"])
            model = self.model or await self.within(lambda left: self.static_info(), deadline)
            if model is None:
                return self.retry_later("no model replica answered within the request's deadline (starting or "
                                        "restarting); retry after the Retry-After delay", "deadline")
            try:
                items = await get_items(model["preprocess"], limits_of(self.cfg, model["image_size"]))
            except RequestError as err:
                self.counts["refused"] += 1
                return error_reply(err.status, str(err))
            nonce = None if self.cfg["replay_draws"] else secrets.token_hex(16)
            good = [it for it in items if it.error is None]
            for it in good:
                it.nonce = nonce
            # the replica gets 90 % of the time left: it drops what cannot start in time and says so, before the
            # ingress would have to cancel the call
            answers = await self.within(lambda left: self.call_model(good, 0.9 * left), deadline)
            if answers is None:
                return self.retry_later(f"no answer within the request's {deadline - start:g} s deadline "
                                        "(replicas busy or restarting); retry after the Retry-After delay",
                                        "deadline")
            kinds = {a.get("error_kind") for a in answers}
            if answers and kinds <= set(RETRYABLE_KINDS):
                kind = "overloaded" if "overloaded" in kinds else "deadline"
                return self.retry_later(answers[0]["error"], kind)
            it_answers = iter(answers)
            results = [next(it_answers) if it.error is None else
                       {"name": it.name, "error": it.error, "error_kind": it.error_kind or "decode"} for it in items]
            if all("error" in r for r in results):
                return error_reply(500, "; ".join(r["error"] for r in results)[:2000])
            self.counts["ok"] += 1
            return Reply(200, {"results": results, "defense": model["defense"], "spec": model["spec"],
                               "model": model["model"], "backend": model["backend"],
                               "draws": "replay" if self.cfg["replay_draws"] else "fresh",
                               "latency_ms": round((time.monotonic() - start) * 1e3, 3)})
        finally:
            self.inflight -= 1

    async def within(self, call: Callable[[float], Awaitable], deadline: float):
        """call(seconds left)'s answer, or None when the deadline passed first. A dead replica is retried (the
        router sends the retry to a live one, or waits for the replacement) with back-off until the deadline."""
        delay = 0.05
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return await asyncio.wait_for(call(left), left)
            except asyncio.TimeoutError:
                return None
            except Exception as err:
                if not self.replica_gone(err):
                    raise
                self.counts["replica_retries"] += 1
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(2 * delay, 1.0)

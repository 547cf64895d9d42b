"""The front door of `scc serve`, plain Python tested without Ray: one request in, one `Reply` out.

    front = Front(cfg, call_model, describe, replica_gone=lambda err: ...)
    reply = await front.classify(headers, query, body_chunks)      # Reply(status, {"results": ...} | {"error": ...})

What it guarantees, in order, for every request (each refusal is `{"error": "<one line>", "code": "<stable code>"}`
with a 4xx/503; an unexpected failure is a 500 whose message names a request id, never an exception's text, which
goes to the server log with the same id):
  1. the bearer token (when the server has one): 401 without it, before a byte of the body is read or a gRPC
     message is parsed; compared in constant time as SHA-256 digests, so the token itself is never logged;
  2. one client address holds at most max_client_requests requests at once (429 + Retry-After beyond, before its
     body is read), so one address cannot take every slot;
  3. the body: Content-Length and the bytes read against max_body_bytes (413), all of it within body_timeout_s (408:
     a client that trickles its body cannot hold anything for longer) -- read before admission, so a slow body
     never holds an admission slot;
  4. admission: at most max_queue x replicas requests in flight past their body, beyond that 503 + Retry-After;
  5. parsing and decoding (scc.serve.requests: every budget checked from the headers before any pixel is decoded) in
     a small thread pool, never on the event loop, within the request's deadline (503 + Retry-After when it passes);
  6. the model call, bounded by the request's deadline (timeout_s from arrival): a replica that dies under the call
     (SIGKILL, OOM) is retried on another one until the deadline, and a request that cannot be answered in time, or
     that finds the replicas' queues full, gets 503 + Retry-After; the deadline travels with the images, and a
     replica drops images whose deadline passed while they were queued, before computing them.
Randomness: without replay mode every image gets a fresh secret nonce (a 128-bit one per request with the image's
index in it) that the replica mixes into its secret seed (scc.serve.service.Service.seed_of), so repeating a key
inside one request or across requests never repeats the draws; the answer says which mode served it ("draws":
"fresh" | "replay").
"""
import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from ..errors import SccError
from ..images import Preprocess
from .requests import CODES, RequestError, _int_query, _shown, parse_parts, parse_query, parse_request
from .service import limits_of, replica_memory

RETRYABLE_KINDS = ("overloaded", "deadline")
log = logging.getLogger("scc.serve")


@dataclass
class Reply:
    status: int
    body: dict
    headers: dict = field(default_factory=dict)


def error_reply(status: int, message: str, retry_after: int | None = None, code: str | None = None) -> Reply:
    """The service's one error shape: {"error": message, "code": stable code} (+ Retry-After when retryable)."""
    return Reply(status, {"error": message, "code": code or CODES.get(status, "error")},
                 {"Retry-After": str(retry_after)} if retry_after is not None else {})


def internal_reply(what: str, err: BaseException | None = None) -> Reply:
    """A 500 that tells the client a request id and nothing else; the exception goes to the server log."""
    rid = secrets.token_hex(6)
    log.error("internal error %s in %s", rid, what, exc_info=err)
    return error_reply(500, f"internal error (request {rid}); the server log has the details, and retrying may help",
                       code="internal")


def token_digest(token: str) -> str:
    """What the server keeps of a bearer token: its SHA-256, hex."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def load_token(path: str) -> str:
    """The bearer token of --token-file: its first line, at least 16 characters, in a file only we can read."""
    from ..backends.artifacts import check_private

    try:
        check_private(path, "--token-file", secret=True)
        with open(path) as f:
            token = f.readline().strip()
    except FileNotFoundError:
        raise SccError(f"--token-file {path}: no such file (make one: python -c 'import secrets; "
                       f"print(secrets.token_urlsafe(32))' > {path}; chmod 600 {path})") from None
    if len(token) < 16:
        raise SccError(f"--token-file {path}: the token has {len(token)} characters; use at least 16 random ones")
    return token


def peer_host(peer: str | None) -> str:
    """A gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") or an HTTP client host -> the address alone."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)  # gRPC writes an IPv6 peer as ipv6:%5B::1%5D:port
    if kind in ("ipv4", "ipv6") and rest:
        host = rest.rsplit(":", 1)[0] if kind == "ipv4" or rest.startswith("[") else rest
        return host.strip("[]")
    return peer


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
    means the replica died (retried until the deadline). call_compare(items, budget_s): as call_model, each result
    with the undefended model's answer under "undefended" (the operator page, scc.serve.ui)."""

    def __init__(self, cfg: Mapping, call_model: Callable[..., Awaitable[list]], describe: Callable[[], Awaitable],
                 replica_gone: Callable[[BaseException], bool] = lambda err: False,
                 call_compare: Callable[..., Awaitable[list]] | None = None):
        self.cfg = cfg
        self.call_model, self.describe, self.replica_gone = call_model, describe, replica_gone
        self.call_compare = call_compare
        self.pool = ThreadPoolExecutor(cfg["decode_threads"], thread_name_prefix="scc-decode")
        self.max_inflight = cfg["max_queue"] * max(cfg["replicas"], cfg["max_replicas"] or 0)
        self.inflight = 0
        self.max_client = cfg["max_client_requests"]
        self.clients: dict[str, int] = {}  # client address -> its requests in this ingress now
        if cfg["token_sha256"]:
            self.digest = bytes.fromhex(cfg["token_sha256"])
        elif cfg["token_file"]:  # a `serve deploy` config names the file; the digest is never in a config
            self.digest = bytes.fromhex(token_digest(load_token(cfg["token_file"])))
        else:
            self.digest = None
        self.model: dict | None = None  # the model replicas' static info, fetched on first use
        self.counts = {"requests": 0, "unauthorized": 0, "refused": 0, "busy_client": 0, "overloaded": 0,
                       "deadline": 0, "replica_retries": 0, "internal": 0, "ok": 0}

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
        return error_reply(503, message, self.cfg["retry_after_s"], code=kind)

    def unauthorized(self) -> Reply:
        self.counts["unauthorized"] += 1
        reply = error_reply(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        reply.headers["WWW-Authenticate"] = 'Bearer realm="scc"'
        return reply

    @contextmanager
    def client_slot(self, client: str | None):
        """Yields whether `client` (an address) may start one more request now; counts it while it runs."""
        key = client or "unknown"
        if self.clients.get(key, 0) >= self.max_client:
            self.counts["busy_client"] += 1
            yield False
            return
        self.clients[key] = self.clients.get(key, 0) + 1
        try:
            yield True
        finally:
            self.clients[key] -= 1
            if not self.clients[key]:
                del self.clients[key]

    def too_many(self) -> Reply:
        return error_reply(429, f"too many requests at once from this address ({self.max_client} allowed, the "
                                "server's --max-client-requests); wait for an answer before sending more",
                           self.cfg["retry_after_s"])

    async def static_info(self) -> dict:
        if self.model is None:
            info = await self.describe()
            self.model = {k: info[k] for k in ("model", "defense", "backend", "image_size", "labels")}
            self.model["spec"] = info.get("spec", info["defense"])
            self.model["preprocess"] = Preprocess.from_dict(info["preprocess"])  # the replica's model's own
            self.model["limits"] = limits_of(self.cfg, self.model["image_size"])  # once, not per request
        return self.model

    async def info(self) -> dict:
        """A model replica's /v1/info, with what the front door knows (mode, auth, in-flight requests, counts)."""
        info = dict(await self.describe())
        info["ingress"] = {**replica_memory(), "inflight": self.inflight, "max_inflight": self.max_inflight,
                           "counts": dict(self.counts), "auth": "bearer" if self.digest else "none"}
        return info

    # ------------------------------------------------------------------------------------------------------
    async def classify(self, headers: Mapping[str, str], query: Mapping[str, Sequence[str]],
                       body: AsyncIterator[bytes], client: str | None = None, compare: bool = False,
                       signed_in: bool = False) -> Reply:
        """An HTTP POST /v1/classify (headers: case-insensitive mapping; client: the peer's address). `compare`:
        the operator page's call (each answer with the undefended model's beside it); `signed_in`: its session
        cookie was checked instead of the bearer token."""
        start = time.monotonic()
        self.counts["requests"] += 1
        if not (signed_in or self.authorized(headers.get("authorization"))):
            return self.unauthorized()
        limit = self.cfg["max_body_bytes"]
        length = headers.get("content-length")
        try:  # a client may ask for a shorter deadline than the server's (?timeout_ms=)
            budget = _int_query(query, "timeout_ms", 1, int(self.cfg["timeout_s"] * 1000),
                                f"1..{int(self.cfg['timeout_s'] * 1000)} (the server's --timeout-s)")
        except RequestError as err:
            return self.refused(err)
        deadline = start + (self.cfg["timeout_s"] if budget is None else budget / 1e3)
        with self.client_slot(client) as allowed:
            if not allowed:
                return self.too_many()
            try:  # the whole body, before admission: a slow body never holds a slot of the model's queue
                if length is not None and length.strip().isdigit() and int(length) > limit:
                    raise RequestError(413, f"body of {length.strip()} bytes exceeds the limit of {limit}")
                data = await read_body(body, limit, self.cfg["body_timeout_s"])
            except RequestError as err:
                return self.refused(err)

            def parse(preprocess: Preprocess, limits):
                return parse_request(headers.get("content-type"), data, query, preprocess, limits,
                                     self.cfg["replay_draws"], deadline)

            return await self._admitted(start, deadline, parse, compare)

    async def classify_grpc(self, metadata: Mapping[str, str], raw: bytes, peer: str | None = None) -> Reply:
        """The gRPC Classify call: `raw` is the serialized ClassifyRequest, parsed only after the token (from the
        metadata) and its size have been checked."""
        start = time.monotonic()
        self.counts["requests"] += 1
        if not self.authorized(metadata.get("authorization")):
            return self.unauthorized()
        if len(raw) > self.cfg["max_body_bytes"]:
            return self.refused(RequestError(413, f"message of {len(raw)} bytes exceeds the limit of "
                                                  f"{self.cfg['max_body_bytes']}"))
        deadline = start + self.cfg["timeout_s"]
        client = peer_host(peer)
        with self.client_slot(client) as allowed:
            if not allowed:
                return self.too_many()

            def parse(preprocess: Preprocess, limits):
                from google.protobuf.message import DecodeError

                from .grpc_api import ClassifyRequest, request_query

                try:
                    message = ClassifyRequest.FromString(raw)
                except DecodeError:
                    raise RequestError(400, "not a ClassifyRequest message (scc.serve.grpc_api.PROTO)") from None
                parts = [(_shown(im.name) or f"image[{i}]", im.data) for i, im in enumerate(message.images)]
                seed, keys, top_k = parse_query(request_query(message), limits.max_top_k, self.cfg["replay_draws"],
                                                limits.max_images)
                return parse_parts(parts, preprocess, limits, seed, keys, top_k, deadline)

            return await self._admitted(start, deadline, parse)

    def refused(self, err: RequestError) -> Reply:
        if err.status == 503:
            return self.retry_later(str(err), err.code if err.code in RETRYABLE_KINDS else "deadline")
        self.counts["refused"] += 1
        return error_reply(err.status, str(err), code=err.code)

    async def _admitted(self, start: float, deadline: float, parse, compare: bool = False) -> Reply:
        """Admission, parsing within the deadline, the model call and the answer; never raises."""
        if self.inflight >= self.max_inflight:
            return self.retry_later(f"overloaded: {self.inflight} requests in flight, a limit of "
                                    f"{self.max_inflight}; retry after the Retry-After delay", "overloaded")
        self.inflight += 1
        try:
            return await self._answer(start, deadline, parse, compare)
        except Exception as err:  # anything unforeseen: a request id for the client, the details for the log
            self.counts["internal"] += 1
            return internal_reply("classify", err)
        finally:
            self.inflight -= 1

    async def _answer(self, start: float, deadline: float, parse, compare: bool = False) -> Reply:
        model = self.model or await self.within(lambda left: self.static_info(), deadline)
        if model is None:
            return self.retry_later("no model replica answered within the request's deadline (starting or "
                                    "restarting); retry after the Retry-After delay", "deadline")
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            work = asyncio.get_running_loop().run_in_executor(self.pool, parse, model["preprocess"], model["limits"])
            items = await asyncio.wait_for(work, left)
        except asyncio.TimeoutError:
            return self.retry_later("the request's deadline passed while its images were decoded; retry after the "
                                    "Retry-After delay, or send fewer images per request", "deadline")
        except RequestError as err:
            return self.refused(err)
        if not self.cfg["replay_draws"]:  # fresh draws for every image: the request's nonce and its index
            nonce = secrets.token_hex(16)
            for i, it in enumerate(items):
                it.nonce = f"{nonce}:{i}"
        good = [it for it in items if it.error is None]
        # the replica gets 90 % of the time left: it drops what cannot start in time and says so, before the
        # ingress would have to cancel the call
        call = self.call_compare if compare and self.call_compare is not None else self.call_model
        answers = await self.within(lambda left: call(good, 0.9 * left), deadline)
        if answers is None:
            return self.retry_later(f"no answer within the request's {deadline - start:g} s deadline "
                                    "(replicas busy or restarting); retry after the Retry-After delay", "deadline")
        kinds = {a.get("error_kind") for a in answers}
        if answers and kinds <= set(RETRYABLE_KINDS):
            kind = "overloaded" if "overloaded" in kinds else "deadline"
            return self.retry_later(answers[0]["error"], kind)
        it_answers = iter(answers)
        results = [next(it_answers) if it.error is None else
                   {"name": it.name, "error": it.error, "error_kind": it.error_kind or "decode"} for it in items]
        if all("error" in r for r in results):
            self.counts["internal"] += 1
            return internal_reply("the model replica", RuntimeError("; ".join(r["error"] for r in results)[:2000]))
        self.counts["ok"] += 1
        return Reply(200, {"results": results, "defense": model["defense"], "spec": model["spec"],
                           "model": model["model"], "backend": model["backend"],
                           "draws": "replay" if self.cfg["replay_draws"] else "fresh",
                           "latency_ms": round((time.monotonic() - start) * 1e3, 3)})

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

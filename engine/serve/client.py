"""A minimal client of `scc serve` (standard library; gRPC with grpcio): keep-alive HTTP(S) requests, JSON GETs,
multipart bodies, readiness, and the gRPC Classify call.

    client = Client("https://127.0.0.1:8000", cafile="cert.pem", token=token)
    status, body = client.request("POST", "/v1/classify", png, {"Content-Type": "image/png"})
    ctype, body = multipart([("image", "a.png", png_a), ("image", "b.png", png_b)])
    info = get_json(url, "/v1/info", token=token);  wait_ready(url, timeout=120)
"""
from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse

from ..errors import SccError


def ssl_context(cafile: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """TLS for an https URL: verified against `cafile` (a self-signed server certificate is its own CA), or the
    system's CAs; `verify=False` only for a server's probe of itself."""
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=cafile)


def multipart(parts: list[tuple[str, str, bytes]], boundary: str = "scc-boundary-7d1f0c") -> tuple[str, bytes]:
    """[(field, filename, bytes)] -> (Content-Type, multipart/form-data body)."""
    chunks = []
    for name, filename, data in parts:
        chunks += [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode(), data, b"\r\n"]
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks) + f"--{boundary}--\r\n".encode()


class Client:
    """One keep-alive HTTP(S) connection (per thread); `token` adds `Authorization: Bearer <token>`."""

    def __init__(self, url: str, timeout: float = 60.0, cafile: str | None = None, token: str | None = None,
                 verify: bool = True, source: str | None = None):
        """`source`: the local address to connect from (e.g. another loopback address, 127.0.0.2)."""
        u = urllib.parse.urlsplit(url)
        self.https = u.scheme == "https"
        self.host, self.prefix, self.timeout = u.hostname, u.path.rstrip("/"), timeout
        self.port = u.port or (443 if self.https else 80)
        self.context = ssl_context(cafile, verify) if self.https else None
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.source = (source, 0) if source else None
        self.conn = None

    def _connect(self):
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context,
                                               source_address=self.source)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout, source_address=self.source)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                with_headers: bool = False):
        """(status, body bytes), or (status, body, response headers) with `with_headers`."""
        for attempt in range(2):  # one reconnect when the server closed an idle keep-alive connection
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request(method, self.prefix + path, body=body, headers={**self.auth, **(headers or {})})
                r = self.conn.getresponse()
                data = r.read()
                return (r.status, data, dict(r.getheaders())) if with_headers else (r.status, data)
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()


def get_json(url: str, path: str, cafile: str | None = None, token: str | None = None) -> dict:
    c = Client(url, timeout=30, cafile=cafile, token=token)
    try:
        status, body = c.request("GET", path)
    finally:
        c.close()
    if status != 200:
        raise SccError(f"GET {url}{path}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


def wait_ready(url: str, timeout: float = 120.0, cafile: str | None = None, verify: bool = False) -> float:
    """Poll GET url/readyz until 200 (bounded); returns the seconds waited. TLS is not verified by default: this
    probes a server we started ourselves."""
    start = time.perf_counter()
    while True:
        c = Client(url, timeout=5, cafile=cafile, verify=verify)
        try:
            if c.request("GET", "/readyz")[0] == 200:
                return time.perf_counter() - start
        except (ConnectionError, http.client.HTTPException, OSError):
            pass
        finally:
            c.close()
        if time.perf_counter() - start > timeout:
            raise SccError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.25)


class GrpcClient:
    """The gRPC Classify call of a server started with --grpc-port: classify([(name, bytes, key)]) ->
    (status code name, parsed JSON answer or the error details, trailing metadata); TLS with `cafile`."""

    def __init__(self, target: str, token: str | None = None, timeout: float = 60.0, cafile: str | None = None,
                 max_message_bytes: int | None = None):
        """`cafile`: TLS, verified against this certificate (a server started with --tls-cert)."""
        import grpc

        from .grpc_api import classify_call

        self.grpc = grpc
        options = [] if max_message_bytes is None else [("grpc.max_send_message_length", max_message_bytes)]
        if cafile:
            with open(cafile, "rb") as f:
                self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.call = classify_call(self.channel)
        self.metadata = [("application", "scc")] + ([("authorization", f"Bearer {token}")] if token else [])
        self.timeout = timeout

    def classify(self, images: list[tuple[str, bytes, str]], top_k: int = 0, seed: str = ""):
        from .grpc_api import ClassifyRequest, Image

        request = ClassifyRequest(images=[Image(name=n, data=d, key=k) for n, d, k in images], top_k=top_k,
                                  seed=seed)
        try:
            reply, call = self.call.with_call(request, metadata=self.metadata, timeout=self.timeout)
            return "OK", json.loads(reply.json), dict(call.trailing_metadata() or ())
        except self.grpc.RpcError as err:
            return err.code().name, err.details(), dict(err.trailing_metadata() or ())

    def close(self):
        self.channel.close()

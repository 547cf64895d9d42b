"""What `scc serve` changes in Ray Serve's proxy (imports nothing heavy: it runs in every Ray worker of the service).

    env = proxy_env(header_timeout_s=10, body_timeout_s=10, max_message_bytes=16 << 20, grpc_cert=..., grpc_key=...)
    os.environ.update(env); ray.init(..., runtime_env={"env_vars": env, "worker_process_setup_hook": HOOK})

Ray Serve runs uvicorn (HTTP) and a grpc.aio server (gRPC) in its proxy actor and exposes few of their settings. The
worker setup hook, run in each worker before Serve starts anything there, sets what it does not expose:
- HTTP read deadlines per connection: the request line and headers must arrive within SCC_HEADER_TIMEOUT_S of the
  connection's start (or of the previous answer on a kept-alive connection), and the body within SCC_BODY_TIMEOUT_S
  of the headers; otherwise the connection gets a 408 (when nothing of an answer was sent yet) and is closed. uvicorn
  alone never times out a client that sends its headers slowly.
- TLS (HTTP): TLS 1.2 or newer, TLS 1.2 suites limited to ECDHE key exchange with AEAD ciphers (TLS_CIPHERS; TLS 1.3
  suites are all AEAD), no compression, no renegotiation.
- gRPC: TLS with the HTTP certificate when SCC_GRPC_TLS_CERT/KEY are set (Ray Serve's gRPC proxy has no TLS option),
  on the address scc.serve.loopback chooses; the largest message is RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (Ray reads it).
These patch Ray and uvicorn internals by name; `scc serve` checks the result after it starts (a TLS handshake on the
gRPC port) and the end-to-end tests check the rest (header deadline, TLS versions and suites) on every version CI
installs.
"""
import os

from .loopback import GRPC_CERT_ENV, GRPC_KEY_ENV

HOOK = "scc.serve.proxy.setup_worker"
HEADER_TIMEOUT_ENV = "SCC_HEADER_TIMEOUT_S"
BODY_TIMEOUT_ENV = "SCC_BODY_TIMEOUT_S"
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# TLS 1.2: forward-secret key exchange and AEAD ciphers only (Mozilla's "intermediate" set); TLS 1.3 is always AEAD
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"
BODY_GRACE_S = 2.0  # the ingress answers 408 at --body-timeout-s; the proxy closes what is still open after this


def proxy_env(header_timeout_s: float, body_timeout_s: float, max_message_bytes: int, grpc_cert: str | None = None,
              grpc_key: str | None = None) -> dict[str, str]:
    """The environment of the service's Ray workers that configures the proxy (see the module docstring)."""
    env = {HEADER_TIMEOUT_ENV: f"{header_timeout_s:g}", BODY_TIMEOUT_ENV: f"{body_timeout_s + BODY_GRACE_S:g}",
           GRPC_MAX_MESSAGE_ENV: str(int(max_message_bytes))}
    if grpc_cert:
        env.update({GRPC_CERT_ENV: os.path.abspath(grpc_cert), GRPC_KEY_ENV: os.path.abspath(grpc_key)})
    return env


def setup_worker() -> None:
    """Ray's worker_process_setup_hook for the service: loopback binds, then the proxy's HTTP settings."""
    from .loopback import bind_loopback

    bind_loopback()
    harden_http()


def _seconds(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def deadline_protocol(base: type, header_s: float, body_s: float) -> type:
    """A subclass of uvicorn's HTTP protocol `base` (httptools or h11) with per-connection read deadlines."""
    import asyncio

    class ReadDeadlines(base):
        _scc_timer: asyncio.TimerHandle | None = None
        _scc_state: tuple = (None, None)
        _scc_partial = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._scc_arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._scc_arm(received=True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._scc_arm()

        def connection_lost(self, exc) -> None:
            if self._scc_timer is not None:
                self._scc_timer.cancel()
                self._scc_timer = None
            super().connection_lost(exc)

        def _scc_phase(self) -> str | None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return "headers"
            return "body" if cycle.more_body else None  # None: the request is read, the answer is the app's

        def _scc_arm(self, received: bool = False) -> None:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            state = (self._scc_phase(), self.cycle)
            if state == self._scc_state:  # bytes that did not finish the headers: a request has started
                self._scc_partial = self._scc_partial or (received and state[0] == "headers")
                return
            if self._scc_timer is not None:
                self._scc_timer.cancel()
                self._scc_timer = None
            self._scc_state, self._scc_partial = state, False
            if state[0] is not None:
                self._scc_timer = self.loop.call_later(header_s if state[0] == "headers" else body_s,
                                                       self._scc_expire)

        def _scc_expire(self) -> None:
            self._scc_timer = None
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            phase, cycle = self._scc_state
            answered = cycle is not None and cycle.response_started and not cycle.response_complete
            # an idle kept-alive connection is closed without a word (the client may be sending its next request);
            # one that started a request and did not finish it in time gets a 408 first
            if not answered and (phase == "body" or self._scc_partial):
                what = "request headers" if phase == "headers" else "request body"
                limit = header_s if phase == "headers" else body_s
                body = (b'{"error": "the ' + what.encode() + b' did not arrive within ' + f"{limit:g}".encode() +
                        b' s; send the whole request at once", "code": "timeout"}')
                transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" +
                                body)
            transport.close()

    ReadDeadlines.__name__ = ReadDeadlines.__qualname__ = f"ReadDeadlines{base.__name__}"
    return ReadDeadlines


def harden_http() -> None:
    """In this process, make every uvicorn server Ray starts use read deadlines and the TLS settings above
    (idempotent; does nothing without the service's environment or without uvicorn)."""
    header_s, body_s = _seconds(HEADER_TIMEOUT_ENV), _seconds(BODY_TIMEOUT_ENV)
    if header_s is None or body_s is None:
        return
    try:
        import uvicorn
        from uvicorn.config import HTTP_PROTOCOLS
        from uvicorn.importer import import_from_string
    except ImportError:  # not a worker that can run a proxy
        return
    if getattr(uvicorn.Config, "_scc_hardened", False):
        return
    import ssl

    base_config = uvicorn.Config

    class HardenedConfig(base_config):
        _scc_hardened = True

        def __init__(self, *args, **kwargs):
            http = kwargs.get("http", "auto")
            base = import_from_string(HTTP_PROTOCOLS.get(http, http)) if isinstance(http, str) else http
            kwargs["http"] = deadline_protocol(base, header_s, body_s)
            kwargs["ssl_ciphers"] = TLS_CIPHERS
            super().__init__(*args, **kwargs)

        def load(self) -> None:
            super().load()
            if self.ssl is not None:
                self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
                self.ssl.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE

    uvicorn.Config = HardenedConfig

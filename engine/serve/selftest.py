"""`scc serve`'s start-up self-test: what the patches of scc.serve.proxy and scc.serve.loopback promise, checked from
outside once the service is ready. Each check returns None or one line saying what failed; `scc serve` stops the
service with that line.

    probe = StalledHeaders(host, port, tls=True, header_timeout_s=10).start()   # as soon as the port accepts
    ... wait for /readyz ...
    failures, passed = self_test(host, port, probe, tls=True, grpc_port=9000)   # [] and "TLS 1.1 refused, ..."

Each check gives (None, what passed) or (what failed, ...):

- TLS floor (with --tls-cert): a handshake capped at TLS 1.1 is refused on the HTTP port (and on the gRPC port),
  and a default handshake succeeds (otherwise the refusal proves nothing);
- header deadline: a connection that sends an incomplete request head gets a 408 and is closed within
  --header-timeout-s + SLACK_S of its start. The probe opens its connection as soon as the HTTP port accepts (Serve's
  proxy listens before the model replicas are warm), so it costs at most --header-timeout-s after readiness, and
  usually nothing;
- sockets: with a loopback --host, every listening TCP socket of the service's processes (this process and every
  Ray process below it) is on a loopback address.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
import warnings

from .process import LOOPBACK, descendants, listening

SLACK_S = 3.0  # beyond --header-timeout-s: the proxy's timer fires on a busy event loop of a busy machine
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def target(host: str) -> str:
    """Where a client on this machine reaches a service listening on `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _client_context(highest: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # our own port: the protocol is what is checked
    if highest is not None:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point of offering them
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = highest
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what an old one would
    return ctx


def _handshake(host: str, port: int, ctx: ssl.SSLContext, timeout_s: float) -> str:
    with socket.create_connection((target(host), port), timeout=timeout_s) as sock:
        with ctx.wrap_socket(sock, server_hostname=target(host)) as tls:
            return tls.version() or "?"


def tls_floor(host: str, port: int, what: str = "HTTPS", alpn: list[str] | None = None,
              timeout_s: float = 10.0) -> tuple[str | None, str]:
    """(None, what passed) when `port` refuses a handshake capped at TLS 1.1 and completes a default one;
    (what failed, "") otherwise."""
    modern, old = _client_context(), _client_context(ssl.TLSVersion.TLSv1_1)
    if alpn:
        modern.set_alpn_protocols(alpn)
        old.set_alpn_protocols(alpn)
    where = f"{what} port {target(host)}:{port}"
    try:
        version = _handshake(host, port, modern, timeout_s)
    except (OSError, ssl.SSLError) as err:
        return f"{where} completes no TLS handshake ({type(err).__name__}), so no TLS version check is possible", ""
    try:
        old_version = _handshake(host, port, old, timeout_s)
    except ssl.SSLError as err:
        if err.reason == "NO_PROTOCOLS_AVAILABLE":  # this Python's OpenSSL cannot offer TLS 1.1 at all
            return None, f"{what} {version} (TLS 1.1 not offered by this client's OpenSSL)"
        return None, f"{what} {version}, TLS 1.1 refused"  # the server's protocol-version alert
    except OSError:
        return None, f"{what} {version}, TLS 1.1 refused"  # the server closed the connection in the handshake
    return f"{where} accepted a TLS 1.1 handshake ({old_version}; a default client gets {version})", ""


class StalledHeaders:
    """A connection that sends an incomplete request head and waits: `result()` is None when the service answered
    408 and closed it within header_timeout_s + slack_s of its start, else what happened. `start()` connects from a
    background thread as soon as the port accepts (retrying until `connect_timeout_s`)."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: scc-self-test\r\nX-Scc-Self-Test: "

    def __init__(self, host: str, port: int, tls: bool, header_timeout_s: float, slack_s: float = SLACK_S,
                 connect_timeout_s: float = 600.0):
        self.host, self.port, self.tls = target(host), port, tls
        self.limit_s = header_timeout_s + slack_s
        self.header_timeout_s, self.connect_timeout_s = header_timeout_s, connect_timeout_s
        self.outcome: str | None = "the probe did not run"
        self.seconds: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scc-self-test", daemon=True)

    def start(self) -> "StalledHeaders":
        self.thread.start()
        return self

    def result(self, timeout_s: float | None = None) -> str | None:
        self.thread.join(self.limit_s + 10 if timeout_s is None else timeout_s)
        if self.thread.is_alive():
            return f"the header-deadline probe of {self.host}:{self.port} did not finish"
        return self.outcome

    def _connect(self) -> socket.socket | None:
        deadline = time.monotonic() + self.connect_timeout_s
        while not self.stop.is_set():
            try:
                return socket.create_connection((self.host, self.port), timeout=5)
            except OSError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.2)
        return None

    def _run(self) -> None:
        where = f"HTTP port {self.host}:{self.port}"
        sock = self._connect()
        if sock is None:
            self.outcome = f"{where}: nothing accepted the header-deadline probe's connection"
            return
        start = time.monotonic()
        reply = b""
        try:
            if self.tls:
                sock = _client_context().wrap_socket(sock, server_hostname=self.host)
            sock.sendall(self.HEAD)
            while True:
                left = start + self.limit_s - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            self.outcome = (f"{where} kept a connection with an incomplete request head open for "
                            f"{self.limit_s:g} s (--header-timeout-s {self.header_timeout_s:g})")
            return
        except (OSError, ssl.SSLError):
            pass  # reset after (or instead of) the 408: closed either way, the reply says which
        finally:
            sock.close()
        self.seconds = time.monotonic() - start
        if not reply.startswith(b"HTTP/1.1 408"):
            self.outcome = (f"{where} closed the header-deadline probe after {self.seconds:.1f} s without the 408 of "
                            f"the read deadline ({reply[:40]!r})")
        else:
            self.outcome = None


def loopback_only(host: str, pids: set[int] | None = None) -> tuple[str | None, str]:
    """With a loopback `host`: (None, what passed) when every listening TCP socket of `pids` (default: this process
    and every process below it) is on a loopback address, else (the exposed ones, ""). Another host: not checked."""
    import os

    if host not in LOOPBACK_HOSTS:
        return None, f"sockets not checked (--host {host} is not loopback)"
    pids = pids if pids is not None else {os.getpid(), *descendants(os.getpid())}
    sockets = listening(pids)
    exposed = sorted({(addr, port) for addr, port, _ in sockets if addr not in LOOPBACK})
    if exposed:
        shown = ", ".join(f"{a}:{p}" for a, p in exposed[:6]) + (" ..." if len(exposed) > 6 else "")
        return f"--host {host} but {len(exposed)} listening socket(s) of the service are off loopback: {shown}", ""
    return None, f"{len(sockets)} listening sockets on loopback"


def self_test(host: str, port: int, probe: StalledHeaders, tls: bool = False, grpc_port: int | None = None,
              pids: set[int] | None = None) -> tuple[list[str], str]:
    """Every check (see the module docstring) -> (what failed, one phrase each; what passed, one line)."""
    checks = []
    if tls:
        checks.append(tls_floor(host, port))
        if grpc_port:
            checks.append(tls_floor(host, grpc_port, "gRPC", alpn=["h2"]))
    stalled = probe.result()
    checks.append((stalled, "" if stalled else f"a stalled request head closed with 408 after {probe.seconds:.1f} s "
                                               f"(--header-timeout-s {probe.header_timeout_s:g})"))
    checks.append(loopback_only(host, pids))
    return [bad for bad, _ in checks if bad], "; ".join(ok for bad, ok in checks if not bad)

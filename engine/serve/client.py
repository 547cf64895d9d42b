"""A minimal HTTP client of `scc serve` (standard library only): keep-alive requests, JSON GETs, readiness.

    client = Client("http://127.0.0.1:8000"); status, body = client.request("POST", "/v1/classify", png, headers)
    info = get_json(url, "/v1/info");  wait_ready(url, timeout=120)
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.parse

from ..errors import SccError


class Client:
    """One keep-alive HTTP connection (per thread)."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.prefix, self.timeout = u.hostname, u.port or 80, u.path.rstrip("/"), timeout
        self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        for attempt in range(2):  # one reconnect when the server closed an idle keep-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, self.prefix + path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()


def get_json(url: str, path: str) -> dict:
    c = Client(url, timeout=30)
    try:
        status, body = c.request("GET", path)
    finally:
        c.close()
    if status != 200:
        raise SccError(f"GET {url}{path}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


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

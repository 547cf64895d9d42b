"""A local `scc serve` as a child process, for the tests and benchmarks that need a real service (Linux /proc).

    with ServerProcess(["--replicas", "2", "--replay-draws"], log_path) as server:   # free port, waits for /readyz
        server.url; server.model_pids(); server.listening()                          # its replicas, its sockets
        server.log_lines("scc serve: self-test passed")                               # waits for the line
    server.left_running                                                               # pids still alive after stop

Everything it starts it stops: SIGINT (the service's own clean shutdown), then SIGKILL of whatever of its process
tree is still alive after `stop_timeout`, and it records what had to be killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import SccError
from .client import wait_ready

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc)."""
    children, out, todo = _children(), set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_mb(pid: int) -> float | None:
    try:
        return round(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 2)
    except (OSError, ValueError, IndexError):
        return None


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pids: set[int] | None = None) -> list[tuple[str, int, int]]:
    """[(address, port, pid)] of the TCP sockets in LISTEN state (of `pids` only, when given), from /proc/net."""
    owner: dict[int, int] = {}
    for pid in (pids if pids is not None else [int(d) for d in os.listdir("/proc") if d.isdigit()]):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner[int(target[8:-1])] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in owner:  # 0A: LISTEN
                ip, port = f[1].split(":")
                out.append((_address(ip), int(port, 16), owner[int(f[9])]))
    return out


class ServerProcess:
    """`python -m scc.cli serve <args>` on a free loopback port (see the module docstring)."""

    def __init__(self, args: list[str], log_path: str | Path, port: int | None = None, env: dict | None = None,
                 ready_timeout: float = 240.0, stop_timeout: float = 60.0, scheme: str = "http"):
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "scc.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_worker_niceness": "0", **(env or {})}
        self.log_path, self.ready_timeout, self.stop_timeout = Path(log_path), ready_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()
        self.left_running: list[int] = []
        self.killed: list[int] = []
        self.ready_seconds: float | None = None

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def log_lines(self, prefix: str, timeout: float = 30.0) -> list[str]:
        """The log's lines that start with `prefix`, waiting up to `timeout` s for one while the service runs (it
        prints its self-test's verdict and "ready on" after /readyz already answers)."""
        deadline = time.perf_counter() + timeout
        while True:
            lines = [line for line in self.log(10 ** 7).splitlines() if line.startswith(prefix)]
            if lines or time.perf_counter() > deadline or self.proc is None or self.proc.poll() is not None:
                return lines
            time.sleep(0.2)

    def start(self) -> "ServerProcess":
        start = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.perf_counter() + self.ready_timeout
        while True:
            self.seen |= descendants(self.proc.pid)
            if self.proc.poll() is not None:
                raise SccError(f"scc serve exited with {self.proc.returncode}: {self.log()}")
            try:
                wait_ready(self.url, timeout=1)
                break
            except SccError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise SccError(f"scc serve not ready in {self.ready_timeout:.0f} s: {self.log()}")
        self.ready_seconds = time.perf_counter() - start
        self.seen |= descendants(self.proc.pid)
        return self

    def processes(self) -> set[int]:
        """The service's live process tree (the CLI process and every Ray process below it)."""
        self.seen |= descendants(self.proc.pid)
        return {self.proc.pid, *(p for p in descendants(self.proc.pid) if alive(p))}

    def model_pids(self) -> list[int]:
        """Pids of the live model replicas (Ray names them ray::ServeReplica:scc:scc-model)."""
        return sorted(p for p in self.processes() if cmdline(p).startswith("ray::ServeReplica:scc:scc-model"))

    def listening(self) -> list[tuple[str, int, int]]:
        return listening(self.processes())

    def stop(self) -> int | None:
        """SIGINT and wait; SIGKILL (recorded in `killed`) what is still alive after stop_timeout."""
        if self.proc is None:
            return None
        self.seen |= descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.killed.append(self.proc.pid)
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.time() + 20
        while time.time() < deadline and any(alive(p) for p in self.seen):
            time.sleep(0.25)
        self.left_running = sorted(p for p in self.seen if alive(p))
        for p in self.left_running:  # never leave anything behind, but say so
            try:
                os.kill(p, signal.SIGKILL)
                self.killed.append(p)
            except OSError:
                pass
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Keep a local `scc serve`'s Ray on the loopback interface (imports nothing heavy: it runs in every Ray worker).

    os.environ.update(local_ray_env())          # before `import ray`: Ray's own servers
    bind_loopback()                             # in every worker (scc.serve.proxy.setup_worker): Serve's gRPC servers

Ray binds its services to the node's IP or to every interface even when told `_node_ip_address="127.0.0.1"`
(measured with Ray 2.60: raylet, GCS, dashboard/runtime-env agents and workers on 0.0.0.0, :: or the machine's
address). Two switches put a single-node Ray on 127.0.0.1:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray's single-node mode (its default on macOS/Windows), in which the node IP
  is the loopback address, and Ray's gRPC servers, agents and workers listen there only;
- Ray Serve 2.60 still binds two gRPC servers to `[::]` (every interface): each replica's inter-deployment server
  and the proxy's gRPC ingress. `bind_loopback`, run in each worker by Ray's `worker_process_setup_hook`, rewrites
  those two binds to 127.0.0.1, and serves the gRPC ingress over TLS when the service has a certificate
  (scc.serve.proxy). It patches Ray internals by name and fails closed: a function it replaces that is missing or
  not a function of (server, address) raises `HardeningError` (the worker does not start, and `scc serve` refuses
  to start before Ray does: scc.serve.proxy.check_targets). `scc serve` checks the result after it starts (its
  processes' socket table and the gRPC port's TLS handshake, scc.serve.selftest).
The same environment sets Ray's cluster token for this run only (`RAY_AUTH_TOKEN`, nothing written to ~/.ray) and
turns off Ray's usage reporting.
"""
import importlib
import inspect
import os
import secrets
import sys

from ..errors import SccError

GRPC_HOST_ENV = "SCC_GRPC_HOST"  # the --host of `scc serve`: where its gRPC ingress may listen


def local_ray_env() -> dict[str, str]:
    """Environment for a local Ray that only this run can reach: loopback, a fresh cluster token, no usage stats."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def _rebind(address: str, host: str) -> str:
    """`[::]:PORT` -> `HOST:PORT` (IPv6 hosts bracketed); anything else unchanged."""
    if not address.startswith("[::]:") or host in ("0.0.0.0", "::", ""):
        return address
    return f"[{host}]:{address[5:]}" if ":" in host else f"{host}:{address[5:]}"


GRPC_CERT_ENV, GRPC_KEY_ENV = "SCC_GRPC_TLS_CERT", "SCC_GRPC_TLS_KEY"


def grpc_server_credentials():
    """grpc.ssl_server_credentials from SCC_GRPC_TLS_CERT/KEY, or None when gRPC is plaintext."""
    cert, key = os.environ.get(GRPC_CERT_ENV), os.environ.get(GRPC_KEY_ENV)
    if not cert or not key:
        return None
    import grpc

    with open(key, "rb") as k, open(cert, "rb") as c:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


class HardeningError(SccError):
    """A Ray or uvicorn internal that `scc serve` patches is missing or not what it expects: the service refuses to
    start rather than run without the patch (one line, naming the versions and what was not found)."""


def versions() -> str:
    """"ray X, uvicorn Y" as installed (from the package metadata: works when an import fails too)."""
    from importlib import metadata

    out = []
    for name in ("ray", "uvicorn"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def refusal(problems: list[str], what: str = "not found") -> HardeningError:
    """The one-line refusal: the versions, each problem, and that nothing starts without the patches."""
    return HardeningError(f"scc serve cannot harden Ray Serve's proxy on {versions()}: {'; '.join(problems)} "
                          f"{what}; refusing to start without its read deadlines, TLS settings and loopback gRPC "
                          "binds (scc is tested with ray[serve] 2.60, the range its serve extra installs)")


def is_binder(fn) -> bool:
    """Whether `fn` is what the loopback patch replaces: a plain function of (server, address)."""
    if not inspect.isfunction(fn):
        return False
    params = list(inspect.signature(fn).parameters.values())
    return len(params) == 2 and all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


# (module, function, host: "ingress" = SCC_GRPC_HOST, tls) of each gRPC bind Ray Serve makes on [::]
BINDERS = (("ray.serve._private.replica", "add_port_to_grpc_server", "loopback", False),
           ("ray.serve._private.default_impl", "add_grpc_address", "ingress", True))


def _binder(original, host: str, tls: bool):
    def patched(server, address):
        credentials = grpc_server_credentials() if tls else None
        if credentials is not None:
            return server.add_secure_port(_rebind(address, host), credentials)
        return original(server, _rebind(address, host))

    patched._scc_loopback = True
    patched.__name__ = patched.__qualname__ = original.__name__
    return patched


def bind_loopback() -> None:
    """In this process, bind each replica's inter-deployment gRPC server to 127.0.0.1 and the proxy's gRPC ingress
    to `scc serve --host` (SCC_GRPC_HOST, default 127.0.0.1) instead of `[::]`, the latter over TLS when the service
    has a certificate (SCC_GRPC_TLS_CERT/KEY) (idempotent). HardeningError when a function it replaces is missing or
    is not a function of (server, address): nothing is left binding [::] unchecked."""
    ingress_host = os.environ.get(GRPC_HOST_ENV, "127.0.0.1")
    problems, todo = [], []
    for module_name, name, host, tls in BINDERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            problems.append(f"module {module_name}")
            continue
        original = getattr(module, name, None)
        if getattr(original, "_scc_loopback", False):
            continue
        if not is_binder(original):
            problems.append(f"{module_name}.{name} (a function of (server, address))")
            continue
        todo.append((module, name, original,
                     _binder(original, ingress_host if host == "ingress" else "127.0.0.1", tls)))
    if problems:
        raise refusal(problems)
    for module, name, original, patched in todo:
        # every binding of the function in Ray Serve's loaded modules (a `from ... import` copies the name)
        for other in [m for k, m in list(sys.modules.items()) if k.startswith("ray.serve") and m is not None]:
            if getattr(other, name, None) is original:
                setattr(other, name, patched)
        setattr(module, name, patched)

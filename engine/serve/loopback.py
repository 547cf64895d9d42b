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
  (scc.serve.proxy). It patches Ray internals by name and does nothing where they are absent; the socket-table test
  (tests/test_serve_e2e.py) is what proves the result, on every Ray version CI installs, and `scc serve` checks the
  gRPC port's TLS handshake itself after it starts.
The same environment sets Ray's cluster token for this run only (`RAY_AUTH_TOKEN`, nothing written to ~/.ray) and
turns off Ray's usage reporting.
"""
import os
import secrets

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


def bind_loopback() -> None:
    """In this process, bind each replica's inter-deployment gRPC server to 127.0.0.1 and the proxy's gRPC ingress
    to `scc serve --host` (SCC_GRPC_HOST, default 127.0.0.1) instead of `[::]`, the latter over TLS when the service
    has a certificate (SCC_GRPC_TLS_CERT/KEY) (idempotent)."""
    try:
        from ray.serve._private import default_impl, replica
    except ImportError:  # not a Serve worker's Ray
        return
    ingress_host = os.environ.get(GRPC_HOST_ENV, "127.0.0.1")
    for module, name, host, tls in ((replica, "add_port_to_grpc_server", "127.0.0.1", False),
                                    (default_impl, "add_grpc_address", ingress_host, True)):
        original = getattr(module, name, None)
        if original is None or getattr(original, "_scc_loopback", False):
            continue

        def patched(server, address, _original=original, _host=host, _tls=tls):
            credentials = grpc_server_credentials() if _tls else None
            if credentials is not None:
                return server.add_secure_port(_rebind(address, _host), credentials)
            return _original(server, _rebind(address, _host))

        patched._scc_loopback = True
        setattr(module, name, patched)

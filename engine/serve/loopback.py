"""Keep a local `scc serve`'s Ray on the loopback interface (imports nothing heavy: it runs in every Ray worker).

    os.environ.update(local_ray_env())                               # before `import ray`: Ray's own servers
    ray.init(..., runtime_env={"worker_process_setup_hook": HOOK})   # Serve's gRPC servers in every worker

Ray binds its services to the node's IP or to every interface even when told `_node_ip_address="127.0.0.1"`
(measured with Ray 2.60: raylet, GCS, dashboard/runtime-env agents and workers on 0.0.0.0, :: or the machine's
address). Two switches put a single-node Ray on 127.0.0.1:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray's single-node mode (its default on macOS/Windows), in which the node IP
  is the loopback address, and Ray's gRPC servers, agents and workers listen there only;
- Ray Serve 2.60 still binds two gRPC servers to `[::]` (every interface): each replica's inter-deployment server
  and the proxy's gRPC ingress. `bind_loopback`, run in each worker by Ray's `worker_process_setup_hook`, rewrites
  those two binds to 127.0.0.1. It patches Ray internals by name and does nothing where they are absent; the
  socket-table test (tests/test_serve_e2e.py) is what proves the result, on every Ray version CI installs.
The same environment sets Ray's cluster token for this run only (`RAY_AUTH_TOKEN`, nothing written to ~/.ray) and
turns off Ray's usage reporting.
"""
import os
import secrets

HOOK = "scc.serve.loopback.bind_loopback"
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


def bind_loopback() -> None:
    """In this process, bind each replica's inter-deployment gRPC server to 127.0.0.1 and the proxy's gRPC ingress
    to `scc serve --host` (SCC_GRPC_HOST, default 127.0.0.1) instead of `[::]` (idempotent)."""
    try:
        from ray.serve._private import default_impl, replica
    except ImportError:  # not a Serve worker's Ray
        return
    ingress_host = os.environ.get(GRPC_HOST_ENV, "127.0.0.1")
    for module, name, host in ((replica, "add_port_to_grpc_server", "127.0.0.1"),
                               (default_impl, "add_grpc_address", ingress_host)):
        original = getattr(module, name, None)
        if original is None or getattr(original, "_scc_loopback", False):
            continue

        def patched(server, address, _original=original, _host=host):
            return _original(server, _rebind(address, _host))

        patched._scc_loopback = True
        setattr(module, name, patched)

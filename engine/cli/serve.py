"""`scc serve`: serve a defended zero-shot classifier over HTTP(S) and optionally gRPC (Ray Serve). POST
/v1/classify, GET /healthz, /readyz, /v1/info. Listens on 127.0.0.1 unless --host says otherwise (a local Ray's own
ports stay on loopback either way); SIGINT or SIGTERM shuts it down cleanly."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import SccError
from .args import (DEFENSE_CHOICES, TINY_NAME, add_common, add_device_arg, nonnegative_int, port_int, positive_float,
                   positive_int, seed_int)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a defended model over HTTP (Ray Serve)", description=__doc__)
    p.add_argument("--model", default=TINY_NAME, help="open_clip model name or a bundled model")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, checkpoint path, or none")
    p.add_argument("--labels", default=None, help="comma-separated class names (default for a bundled model: its own)")
    p.add_argument("--templates", default=None, help="'|'-separated prompt templates with {}")
    p.add_argument("--defense", default="scc", help=DEFENSE_CHOICES.replace(", ", " | "))
    p.add_argument("--backend", default="eager", choices=("eager", "compiled", "triton", "onnx"),
                   help="scc.backends runner each replica owns")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=None, help="the service's seed (default: a fresh secret per "
                                                               "replica)")
    p.add_argument("--replay-draws", "--client-seeds", dest="replay_draws", action="store_true",
                   help="replay mode: an image's draws are a function of (?seed= or the service's seed, ?key=) "
                        "only, so identical requests get identical answers (tests, reproducible pipelines). Default: "
                        "fresh draws for every request whatever key is sent (a client cannot query a fixed-draw "
                        "function), and ?seed= is refused (403). --client-seeds is the old name")
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest engine bucket")
    p.add_argument("--batch-wait-ms", type=positive_float, default=2.0,
                   help="how long an idle engine waits for a fuller batch when fewer than --max-batch images wait")
    p.add_argument("--replicas", type=positive_int, default=1, help="fixed number of model replicas")
    p.add_argument("--ingress-replicas", type=positive_int, default=1, help="ingress replicas (parse, decode, route)")
    p.add_argument("--min-replicas", type=positive_int, default=None, help="autoscaling: minimum replicas")
    p.add_argument("--max-replicas", type=positive_int, default=None, help="autoscaling: maximum replicas")
    p.add_argument("--target-ongoing", type=positive_float, default=None,
                   help="autoscaling target ongoing requests per replica")
    p.add_argument("--max-ongoing", type=positive_int, default=None,
                   help="max_ongoing_requests per model replica (default: --max-queue + --max-batch)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="images that may wait per model replica; beyond it a request gets 503 + Retry-After")
    p.add_argument("--top-k", type=positive_int, default=5, help="scores returned per image unless ?top_k=")
    p.add_argument("--max-body-mb", type=positive_float, default=16.0, help="largest request body in MB")
    p.add_argument("--max-pixels", type=positive_int, default=None,
                   help="largest image (width x height from its header, refused before decoding); default (16 S)^2 "
                        "for a model input of S x S")
    p.add_argument("--max-request-pixels", type=positive_int, default=None,
                   help="pixels of all images of one request; default 4x --max-pixels")
    p.add_argument("--max-images", type=positive_int, default=64, help="images per request (at most --max-queue)")
    p.add_argument("--max-aspect", type=positive_float, default=16.0,
                   help="refuse (413, from the header) an image whose long side exceeds this many times its short "
                        "side; below it the model's own rule centre-crops to at most 4:1")
    p.add_argument("--image-formats", default="png,jpeg,webp",
                   help="the decoders a request may reach, comma-separated: png, jpeg, webp (default) and gif, bmp, "
                        "tiff, ppm")
    p.add_argument("--max-client-requests", type=positive_int, default=32,
                   help="requests one client address may have in the service at once (429 + Retry-After beyond)")
    p.add_argument("--timeout-s", type=positive_float, default=30.0,
                   help="request deadline from arrival: 503 + Retry-After when no answer by then")
    p.add_argument("--body-timeout-s", type=positive_float, default=10.0,
                   help="a request body must arrive within this many seconds (408)")
    p.add_argument("--header-timeout-s", type=positive_float, default=10.0,
                   help="a connection's request line and headers must arrive within this many seconds (408, then "
                        "closed)")
    p.add_argument("--retry-after-s", type=nonnegative_int, default=1, help="the Retry-After of a 503")
    p.add_argument("--decode-threads", type=positive_int, default=2, help="image-decoding threads of the ingress")
    p.add_argument("--compile-cache", default=None,
                   help="folder for the compile caches (compiled backend); refused unless only you can write it")
    p.add_argument("--cache-key-file", default=None,
                   help="HMAC key of the compile-cache artifacts (default: DIR/scc-cache.key, made on first start)")
    p.add_argument("--token-file", default=None,
                   help="require 'Authorization: Bearer <token>' on /v1/classify, /v1/info and gRPC (the file's "
                        "first line; mode 0600)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve HTTPS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (mode 0600)")
    p.add_argument("--grpc-port", type=port_int, default=None,
                   help="also serve gRPC scc.v1.Classifier/Classify on this port (TLS with --tls-cert; loopback "
                        "unless --host says otherwise)")
    p.add_argument("--insecure-grpc", action="store_true",
                   help="allow a plaintext --grpc-port on a non-loopback --host (without --tls-cert); the token then "
                        "travels in the clear")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to expose)")
    p.add_argument("--port", type=port_int, default=8000, help="HTTP port")
    p.add_argument("--metrics-port", type=port_int, default=None,
                   help="Ray's Prometheus endpoint port (local Ray; default: Ray picks one); metrics are ray_scc_*")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray://HOST:PORT, HOST:PORT or auto): "
                                                   "deploy and exit")
    p.add_argument("--ui", action="store_true",
                   help="serve the operator page at /ui: drop an image, see the defended and the undefended answer "
                        "(behind the token when there is one)")
    p.add_argument("--print-config", action="store_true", help="print the Ray Serve config YAML for `serve deploy`")
    add_common(p, json_output=False, threads_default=1)
    p.set_defaults(func=run)


def check_tls(cert: str | None, key: str | None) -> None:
    from ..backends.artifacts import check_private

    if bool(cert) != bool(key):
        raise SccError("--tls-cert and --tls-key go together")
    if cert:
        for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
            try:
                with open(path, "rb") as f:
                    head = f.read(64)
            except OSError as err:
                raise SccError(f"{flag} {path}: {err.strerror}") from None
            if b"-----BEGIN" not in head:
                raise SccError(f"{flag} {path}: not a PEM file")
        check_private(key, "--tls-key", secret=True)


def check_grpc_exposure(a: argparse.Namespace) -> None:
    """A plaintext gRPC port on a non-loopback host carries the token in the clear: refused unless --insecure-grpc."""
    from ..serve.selftest import LOOPBACK_HOSTS

    if a.grpc_port and a.host not in LOOPBACK_HOSTS and not a.tls_cert and not a.insecure_grpc:
        raise SccError(f"--grpc-port {a.grpc_port} on --host {a.host} would be plaintext: give --tls-cert/--tls-key "
                       "(gRPC then uses TLS too), keep --host on loopback, or accept it with --insecure-grpc")


def config_of(a: argparse.Namespace) -> dict:
    """The service configuration (scc.serve.service.service_config) these arguments describe."""
    from ..serve.front import load_token, token_digest
    from ..serve.service import service_config

    digest = token_digest(load_token(a.token_file)) if a.token_file else None  # the ingress's copy, never printed
    return service_config(
        model=a.model, pretrained=a.pretrained, labels=a.labels, templates=a.templates, defense=a.defense,
        backend=a.backend, dtype=a.dtype, device=a.device, seed=a.seed, max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms, replicas=a.replicas, ingress_replicas=a.ingress_replicas,
        min_replicas=a.min_replicas, max_replicas=a.max_replicas, target_ongoing=a.target_ongoing,
        max_ongoing=a.max_ongoing, max_queue=a.max_queue, threads=a.threads, top_k=a.top_k,
        max_body_bytes=int(a.max_body_mb * 2 ** 20), max_pixels=a.max_pixels, max_request_pixels=a.max_request_pixels,
        max_images=a.max_images, timeout_s=a.timeout_s, body_timeout_s=a.body_timeout_s,
        retry_after_s=a.retry_after_s, decode_threads=a.decode_threads, compile_cache=a.compile_cache,
        cache_key_file=a.cache_key_file, replay_draws=a.replay_draws, token_sha256=digest,
        token_file=os.path.abspath(a.token_file) if a.token_file else None, max_aspect=a.max_aspect,
        image_formats=a.image_formats, max_client_requests=a.max_client_requests,
        header_timeout_s=a.header_timeout_s, ui=a.ui)


def run(a: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..serve.app import run as serve, serve_config_yaml

    cfg = config_of(a)
    check_tls(a.tls_cert, a.tls_key)
    check_grpc_exposure(a)
    from ..precision import check_dtype_on_device, resolve_dtype

    # here, before Ray starts: a replica's warning or refusal would reach only the replica's log
    check_dtype_on_device(resolve_dtype(cfg["dtype"], cfg["device"]), cfg["device"])
    if a.print_config:
        sys.stdout.write(serve_config_yaml(cfg, a.host, a.port, a.timeout_s, a.tls_cert, a.tls_key, a.grpc_port))
        return 0
    if cfg["compile_cache"] and a.address is None:  # the replicas check again (and never read a refused folder)
        from ..backends.artifacts import cache_mac_key, check_cache_folder

        check_cache_folder(cfg["compile_cache"])
        cache_mac_key(cfg["compile_cache"], cfg["cache_key_file"])
    require_extra("serve", ["ray", "fastapi"], what="scc serve")
    log = (lambda line: None) if a.quiet else (lambda line: print(line, flush=True))
    return serve(cfg, host=a.host, port=a.port, address=a.address, metrics_port=a.metrics_port, tls_cert=a.tls_cert,
                 tls_key=a.tls_key, grpc_port=a.grpc_port, log=log)

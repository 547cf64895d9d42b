"""`scc serve`: serve a defended zero-shot classifier over HTTP (Ray Serve). POST /v1/classify, GET /healthz,
/readyz, /v1/info. Listens on 127.0.0.1 unless --host says otherwise; SIGINT or SIGTERM shuts it down cleanly."""
from __future__ import annotations

import argparse
import sys

from .args import (DEFENSE_CHOICES, TINY_NAME, add_common, add_device_arg, port_int, positive_float, positive_int,
                   seed_int)


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
    p.add_argument("--client-seeds", action="store_true",
                   help="let requests choose ?seed= (reproducible answers, e.g. for tests; whoever picks the seed "
                        "knows the draws, so leave it off in production: such requests get 403)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest engine bucket = @serve.batch "
                                                                     "max_batch_size")
    p.add_argument("--batch-wait-ms", type=positive_float, default=5.0, help="@serve.batch batch_wait_timeout_s in ms")
    p.add_argument("--replicas", type=positive_int, default=1, help="fixed number of replicas")
    p.add_argument("--min-replicas", type=positive_int, default=None, help="autoscaling: minimum replicas")
    p.add_argument("--max-replicas", type=positive_int, default=None, help="autoscaling: maximum replicas")
    p.add_argument("--target-ongoing", type=positive_float, default=None,
                   help="autoscaling target ongoing requests per replica")
    p.add_argument("--max-ongoing", type=positive_int, default=None,
                   help="max_ongoing_requests per replica (default: max(64, 2x --max-batch))")
    p.add_argument("--top-k", type=positive_int, default=5, help="scores returned per image unless ?top_k=")
    p.add_argument("--max-body-mb", type=positive_float, default=16.0, help="largest request body in MB")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000, help="largest decoded image (PIL's bomb "
                                                                               "limit)")
    p.add_argument("--max-images", type=positive_int, default=64, help="images per multipart request")
    p.add_argument("--timeout-s", type=positive_float, default=30.0, help="request timeout in seconds")
    p.add_argument("--compile-cache", default=None, help="folder for Inductor's compile caches (compiled backend)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to expose)")
    p.add_argument("--port", type=port_int, default=8000, help="HTTP port")
    p.add_argument("--metrics-port", type=port_int, default=None,
                   help="Ray's Prometheus endpoint port (local Ray; default: Ray picks one); metrics are ray_scc_*")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray://HOST:PORT or auto): deploy and exit")
    p.add_argument("--print-config", action="store_true", help="print the Ray Serve config YAML for `serve deploy`")
    add_common(p, json_output=False, threads_default=1)
    p.set_defaults(func=run)


def config_of(a: argparse.Namespace) -> dict:
    """The service configuration (scc.serve.service.service_config) these arguments describe."""
    from ..serve.service import service_config

    return service_config(
        model=a.model, pretrained=a.pretrained, labels=a.labels, templates=a.templates, defense=a.defense,
        backend=a.backend, dtype=a.dtype, device=a.device, seed=a.seed, max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms, replicas=a.replicas, min_replicas=a.min_replicas,
        max_replicas=a.max_replicas, target_ongoing=a.target_ongoing, max_ongoing=a.max_ongoing, threads=a.threads,
        top_k=a.top_k, max_body_bytes=int(a.max_body_mb * 2 ** 20), max_pixels=a.max_pixels,
        max_images=a.max_images, timeout_s=a.timeout_s, compile_cache=a.compile_cache, client_seeds=a.client_seeds)


def run(a: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..serve.app import run as serve, serve_config_yaml

    cfg = config_of(a)
    if a.print_config:
        sys.stdout.write(serve_config_yaml(cfg, a.host, a.port, a.timeout_s))
        return 0
    require_extra("serve", ["ray", "fastapi"], what="scc serve")
    log = (lambda line: None) if a.quiet else (lambda line: print(line, flush=True))
    return serve(cfg, host=a.host, port=a.port, address=a.address, metrics_port=a.metrics_port, log=log)

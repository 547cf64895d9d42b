"""`scc export onnx|triton-server ...`: write a defended classifier to an ONNX file or a Triton Inference Server
model repository.

    scc export onnx --model scc-tiny-digits --defense scc-latency --out scc.onnx                  # any batch size
    scc export onnx --model scc-tiny-digits --defense ttc --batch-size 8 --draws-as-inputs --out ttc-b8.onnx
    scc export triton-server --model scc-tiny-digits --defense scc-latency --out repo --max-batch 8
    scc export onnx --model ViT-B-32 --pretrained openai --defense ttc --labels cat,dog --out ttc.onnx

Progress lines (loading, tracing, exporting, optimizing, saving) go to stderr unless --quiet: a ViT-B/32 export
takes minutes.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..errors import SccError
from .args import (Parser, add_common, add_labels_args, add_templates_arg, apply_threads, check_output,
                   deprecated_flag, nonnegative_float, nonnegative_int, parse_labels, parse_templates, positive_int,
                   seed_int, status, version)
from .interrupts import interruptible


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="open_clip model name (ViT-B-32, RN50, ...) or a bundled model (scc-tiny-digits, ...)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint path (default: none; bundled for a bundled model)")
    parser.add_argument("--defense", required=True, help="ttc | scc | scc-latency (name-preset, as in the other "
                                                         "commands)")
    parser.add_argument("--preset", default=None, help="paper | latency (default: the one in --defense, else paper)")
    add_labels_args(parser, "the model's own, bundled models only")
    add_templates_arg(parser, "the model's own, 'a photo of a {}.' for open_clip models (space-separated arguments "
                              "are accepted too)", nargs="+")
    parser.add_argument("--draws-as-inputs", action="store_true",
                        help="take the random draws (start, noise) as inputs instead of drawing them in the graph")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false", help="skip the ONNX optimizer passes")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of random weights (--pretrained none)")
    parser.add_argument("--dtype", default="fp32",
                        help="the image tower's precision in the file: fp32 (default) | fp16 (GPU runtimes: ORT CUDA, "
                             "TensorRT) | bf16; patch stem, LayerNorms, perturbation, losses and logits stay fp32")
    add_common(parser, json_output=False)


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="export a defended model: one ONNX file or a Triton Inference Server "
                                           "model repository", description=__doc__)
    parser.add_argument("--version", action="version", version=version())
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=Parser)
    onnx = formats.add_parser("onnx", help="the whole defended procedure as one ONNX graph",
                              description="Write the whole defended procedure (counterattack, views, corrective "
                                          "steps and their gradients, logits) as one ONNX file: input `pixels` "
                                          "(B, 3, S, S) float32 in [0,1], output `logits` (B, C). B is dynamic "
                                          "unless --batch-size fixes it.")
    _model_arguments(onnx)
    onnx.add_argument("--batch-size", type=positive_int, default=None,
                      help="write a fixed-shape file for this batch size (TensorRT engines, CUDA graphs) "
                           "(default: one file for every batch size)")
    onnx.add_argument("--out", required=True, help="output .onnx file (its folder must exist)")
    onnx.set_defaults(func=run)

    server = formats.add_parser("triton-server", help="a ready NVIDIA Triton Inference Server model repository",
                                description=SERVER_DESCRIPTION)
    _server_arguments(server)
    # the name of the previous release, kept for one release: not listed, one warning line when used
    old = formats.add_parser("triton", description=SERVER_DESCRIPTION)
    old.replaced_by = "scc export triton-server"
    _server_arguments(old)


SERVER_DESCRIPTION = ("Write REPO/NAME/config.pbtxt, REPO/NAME/labels.txt and REPO/NAME/1/model.onnx (batch-dynamic) "
                      "for Triton Inference Server's ONNX Runtime backend, with dynamic batching.")


def _server_arguments(server: argparse.ArgumentParser) -> None:
    _model_arguments(server)
    server.add_argument("--out", required=True, metavar="REPO", help="the model repository folder (created if "
                                                                     "its parent exists)")
    server.add_argument("--name", default=None,
                        help="model name = its folder (default: MODEL-DEFENSE[-PRESET], e.g. scc-tiny-digits-ttc)")
    server.add_argument("--max-batch", type=positive_int, default=8, help="max_batch_size")
    server.add_argument("--instances", type=positive_int, default=1, help="model instances per device")
    server.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"],
                        help="instance kind: auto = KIND_AUTO (GPUs when present, else CPU), "
                             "gpu = KIND_GPU, cpu = KIND_CPU")
    server.add_argument("--tensorrt", action="store_true",
                        help="add ONNX Runtime's TensorRT execution provider as GPU accelerator (FP32)")
    server.add_argument("--queue-delay-ms", type=nonnegative_float, default=0.5, metavar="MS",
                        help="dynamic batching's queue delay, written as max_queue_delay_microseconds (whole "
                             "microseconds)")
    deprecated_flag(server, "--queue-delay-us", "--queue-delay-ms", type=nonnegative_int,
                    convert=lambda us: us / 1000)
    server.add_argument("--overwrite", action="store_true", help="replace an existing REPO/NAME")
    server.set_defaults(func=run)


SERVER_FORMATS = ("triton-server", "triton")  # `triton`: the deprecated name of `triton-server`


def _defended(args: argparse.Namespace):
    """The defended model the arguments name (one SccError line for a bad defense, label or template)."""
    from ..defenses import DEFENSES, defend, parse_defense
    from ..errors import require_extra
    from ..models import load

    name, preset = parse_defense(args.defense)
    if args.preset is not None:
        if "-" in args.defense and preset != args.preset:
            raise SccError(f"--defense {args.defense} and --preset {args.preset} disagree; give one of them")
        name, preset = parse_defense(f"{name}-{args.preset}")
    if not DEFENSES[name].exports:
        raise SccError(f"defense {name!r} cannot be exported: {DEFENSES[name].why_not}")
    labels = parse_labels(args.labels, args.labels_file)
    templates = parse_templates(args.templates)
    require_extra("onnx", ["onnx", "onnxscript"], what="ONNX export")
    apply_threads(args.threads)
    status(args, f"export: loading {args.model}")
    clf = load(args.model, args.pretrained, labels, templates, seed=args.seed)
    return defend(clf, name, preset=preset)


def run(args: argparse.Namespace) -> int:
    from ..precision import resolve_dtype

    dtype = resolve_dtype(args.dtype, "cpu")  # the trace runs on the CPU; "auto" is fp32 there
    progress = None if args.quiet else (lambda line: status(args, f"export: {line}"))
    unfinished = f"the export did not finish; {args.out} may be incomplete: run the export again"
    with interruptible("files", lambda report: [], total=1, unsaved=unfinished) as keep, \
            warnings.catch_warnings():  # skipped optimizer passes are printed below instead
        keep(lambda: ({}, 0, 1, [args.out]))
        warnings.filterwarnings("ignore", message=".*skipped optimizer passes.*")
        if args.format in SERVER_FORMATS:
            from ..export.triton_server import export_triton_server, model_repository_tree, triton_server_config

            repo = Path(args.out)
            if not repo.parent.is_dir():  # fail before loading the model
                raise SccError(f"cannot write the repository {repo}: the folder {repo.parent} does not exist")
            triton_server_config("check", {"pixels": [3, 1, 1]}, {"logits": [1]}, args.max_batch, args.instances,
                                 args.device, args.tensorrt, queue_delay_ms=args.queue_delay_ms)  # bad numbers: now
            info = export_triton_server(_defended(args), repo, name=args.name, max_batch=args.max_batch,
                                        instances=args.instances, device=args.device, tensorrt=args.tensorrt,
                                        queue_delay_ms=args.queue_delay_ms, draws_as_inputs=args.draws_as_inputs,
                                        opset=args.opset, optimize=args.optimize, overwrite=args.overwrite,
                                        dtype=dtype, progress=progress)
            onnx_info = info["onnx"]
        else:
            check_output(args.out, "--out")  # fail before loading the model
            defended = _defended(args)
            from ..export import export_onnx

            info = onnx_info = export_onnx(defended, args.out, batch_size=args.batch_size,
                                           draws_as_inputs=args.draws_as_inputs, opset=args.opset,
                                           optimize=args.optimize, dtype=dtype, progress=progress)
    if args.format in SERVER_FORMATS:
        print(f"wrote the Triton Inference Server model {info['name']!r} in {info['repo']} ({info['seconds']:.1f} s; "
              f"config checked with {' + '.join(info['validated_with'])}):")
        for path in model_repository_tree(info["model_dir"]):
            print(f"  {path}")
        print(f"model.onnx: {_describe(onnx_info)}")
        print(f"serve: tritonserver --model-repository={Path(info['repo']).resolve()}")
    else:
        print(f"wrote {info['path']}: {_describe(info)}")
    for skipped in onnx_info.get("skipped_passes", []):
        print(f"skipped: {skipped}")
    return 0


def _describe(info: dict) -> str:
    draws = "inputs " + ", ".join(info["inputs"][1:]) if len(info["inputs"]) > 1 else "drawn in the graph"
    batch = "dynamic" if info["batch_size"] is None else info["batch_size"]
    return (f"{info['bytes'] / 1e6:.1f} MB, {info['dtype']}, {info['nodes']} nodes, opset {info['opset']}, "
            f"batch {batch}, random draws {draws}, {info['seconds']:.1f} s")

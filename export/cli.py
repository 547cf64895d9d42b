"""`scc export onnx|triton ...`: write a defended classifier to an ONNX file or a Triton model repository.

    scc export onnx --model scc-tiny-digits --defense scc --preset latency --out scc.onnx        # any batch size
    scc export onnx --model scc-tiny-digits --defense ttc --batch-size 8 --draws-as-inputs --out ttc-b8.onnx
    scc export triton --model scc-tiny-digits --defense scc --preset latency --out repo --max-batch 8
    python -m scc.export.cli onnx --model ViT-B-32 --pretrained openai --defense ttc --labels cat,dog --out ttc.onnx

`main(argv)` takes the arguments after `export` and returns the exit status (2 on a user error).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

from scc.models import SccError


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="open_clip model name (ViT-B-32, RN50, ...) or scc-tiny-digits")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint path (default: none; bundled for scc-tiny-digits)")
    parser.add_argument("--defense", required=True, choices=["ttc", "scc"])
    parser.add_argument("--preset", default="paper", choices=["paper", "latency"])
    parser.add_argument("--labels", default=None, help="comma-separated class names (default: the model's own, "
                                                       "scc-tiny-digits only)")
    parser.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                        help="prompt templates with a {} placeholder (default: 'a photo of a {}.')")
    parser.add_argument("--draws-as-inputs", action="store_true",
                        help="take the random draws (start, noise) as inputs instead of drawing them in the graph")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false", help="skip the ONNX optimizer passes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scc export", description="Export a defended CLIP classifier.")
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = sub.add_parser("onnx", help="the whole defended procedure as one ONNX graph",
                          description="Write the whole defended procedure (counterattack, views, corrective "
                                      "steps and their gradients, logits) as one ONNX file: input `pixels` "
                                      "(B, 3, S, S) float32 in [0,1], output `logits` (B, C). B is dynamic "
                                      "unless --batch-size fixes it.")
    _model_arguments(onnx)
    onnx.add_argument("--batch-size", type=int, default=None,
                      help="write a fixed-shape file for this batch size (TensorRT engines, CUDA graphs); "
                           "default: one file for every batch size")
    onnx.add_argument("--out", required=True, help="output .onnx file")

    triton = sub.add_parser("triton", help="a ready NVIDIA Triton Inference Server model repository",
                            description="Write REPO/NAME/config.pbtxt, REPO/NAME/labels.txt and "
                                        "REPO/NAME/1/model.onnx (batch-dynamic) for Triton's ONNX Runtime "
                                        "backend, with dynamic batching.")
    _model_arguments(triton)
    triton.add_argument("--out", required=True, metavar="REPO", help="the model repository folder (created if "
                                                                     "its parent exists)")
    triton.add_argument("--name", default=None,
                        help="model name = its folder (default: MODEL-DEFENSE[-PRESET], e.g. scc-tiny-digits-ttc)")
    triton.add_argument("--max-batch", type=int, default=8, help="max_batch_size (default 8)")
    triton.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    triton.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"],
                        help="instance kind: auto = KIND_AUTO (GPUs when present, else CPU; default), "
                             "gpu = KIND_GPU, cpu = KIND_CPU")
    triton.add_argument("--tensorrt", action="store_true",
                        help="add ONNX Runtime's TensorRT execution provider as GPU accelerator (FP32)")
    triton.add_argument("--queue-delay-us", type=int, default=500,
                        help="dynamic batching max_queue_delay_microseconds (default 500)")
    triton.add_argument("--overwrite", action="store_true", help="replace an existing REPO/NAME")
    return parser


def _defended(args: argparse.Namespace):
    import scc

    labels = args.labels.split(",") if args.labels is not None else None
    clf = scc.load(args.model, args.pretrained, labels, args.templates)
    return scc.defend(clf, args.defense, preset=args.preset)


def export_command(args: argparse.Namespace) -> dict:
    from scc.export import export_onnx

    out = Path(args.out)
    if not out.parent.is_dir():  # fail before loading the model
        raise SccError(f"cannot write {out}: the folder {out.parent} does not exist")
    if args.batch_size is not None and args.batch_size < 1:
        raise SccError(f"--batch-size must be a positive integer, got {args.batch_size}; leave it out for a file "
                       "that takes every batch size")
    return export_onnx(_defended(args), args.out, batch_size=args.batch_size, draws_as_inputs=args.draws_as_inputs,
                       opset=args.opset, optimize=args.optimize)


def triton_command(args: argparse.Namespace) -> dict:
    from scc.export.triton import export_triton, triton_config

    repo = Path(args.out)
    if not repo.parent.is_dir():  # fail before loading the model
        raise SccError(f"cannot write the repository {repo}: the folder {repo.parent} does not exist")
    triton_config("check", {"pixels": [3, 1, 1]}, {"logits": [1]}, args.max_batch, args.instances, args.device,
                  args.tensorrt, queue_delay_us=args.queue_delay_us)  # bad numbers: fail before loading the model
    return export_triton(_defended(args), repo, name=args.name, max_batch=args.max_batch, instances=args.instances,
                         device=args.device, tensorrt=args.tensorrt, queue_delay_us=args.queue_delay_us,
                         draws_as_inputs=args.draws_as_inputs, opset=args.opset, optimize=args.optimize,
                         overwrite=args.overwrite)


def _describe(info: dict) -> str:
    draws = "inputs " + ", ".join(info["inputs"][1:]) if len(info["inputs"]) > 1 else "drawn in the graph"
    batch = "dynamic" if info["batch_size"] is None else info["batch_size"]
    return (f"{info['bytes'] / 1e6:.1f} MB, {info['nodes']} nodes, opset {info['opset']}, batch {batch}, "
            f"random draws {draws}, {info['seconds']:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # skipped optimizer passes are printed below instead
            warnings.filterwarnings("ignore", message=".*skipped optimizer passes.*")
            info = triton_command(args) if args.format == "triton" else export_command(args)
    except SccError as err:
        print(f"scc export: error: {err}", file=sys.stderr)
        return 2
    onnx_info = info["onnx"] if args.format == "triton" else info
    if args.format == "triton":
        from scc.export.triton import model_repository_tree

        print(f"wrote the Triton model {info['name']!r} in {info['repo']} ({info['seconds']:.1f} s; config checked "
              f"with {' + '.join(info['validated_with'])}):")
        for path in model_repository_tree(info["model_dir"]):
            print(f"  {path}")
        print(f"model.onnx: {_describe(onnx_info)}")
        print(f"serve: tritonserver --model-repository={Path(info['repo']).resolve()}")
    else:
        print(f"wrote {info['path']}: {_describe(info)}")
    for skipped in onnx_info["skipped_passes"]:
        print(f"skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

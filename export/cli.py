"""`scc export onnx|triton ...`: write a defended classifier to an ONNX file or a Triton model repository.

    scc export onnx --model scc-tiny-digits --defense scc-latency --out scc.onnx                  # any batch size
    scc export onnx --model scc-tiny-digits --defense ttc --batch-size 8 --draws-as-inputs --out ttc-b8.onnx
    scc export triton --model scc-tiny-digits --defense scc-latency --out repo --max-batch 8
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
    from scc.cli import _labels_args, add_common, positive_int

    parser.add_argument("--model", required=True,
                        help="open_clip model name (ViT-B-32, RN50, ...) or scc-tiny-digits")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag or checkpoint path (default: none; bundled for scc-tiny-digits)")
    parser.add_argument("--defense", required=True, help="ttc | scc | scc-latency (name-preset, as in the other "
                                                         "commands)")
    parser.add_argument("--preset", default=None, help="paper | latency (default: the one in --defense, else paper)")
    _labels_args(parser, "the model's own, scc-tiny-digits only")
    parser.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                        help="'|'-separated prompt templates, each with one {} (space-separated arguments are "
                             "accepted too) (default: the model's own, 'a photo of a {}.' for open_clip models)")
    parser.add_argument("--draws-as-inputs", action="store_true",
                        help="take the random draws (start, noise) as inputs instead of drawing them in the graph")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false", help="skip the ONNX optimizer passes")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (--pretrained none)")
    parser.add_argument("--dtype", default="fp32",
                        help="the image tower's precision in the file: fp32 (default) | fp16 (GPU runtimes: ORT CUDA, "
                             "TensorRT) | bf16; patch stem, LayerNorms, perturbation, losses and logits stay fp32")
    add_common(parser, json_output=False)


def build_parser() -> argparse.ArgumentParser:
    from scc.cli import Parser, positive_int, version

    parser = Parser(prog="scc export", description="Export a defended CLIP classifier.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=Parser)
    onnx = sub.add_parser("onnx", help="the whole defended procedure as one ONNX graph",
                          description="Write the whole defended procedure (counterattack, views, corrective "
                                      "steps and their gradients, logits) as one ONNX file: input `pixels` "
                                      "(B, 3, S, S) float32 in [0,1], output `logits` (B, C). B is dynamic "
                                      "unless --batch-size fixes it.")
    _model_arguments(onnx)
    onnx.add_argument("--batch-size", type=positive_int, default=None,
                      help="write a fixed-shape file for this batch size (TensorRT engines, CUDA graphs) "
                           "(default: one file for every batch size)")
    onnx.add_argument("--out", required=True, help="output .onnx file (its folder must exist)")

    triton = sub.add_parser("triton", help="a ready NVIDIA Triton Inference Server model repository",
                            description="Write REPO/NAME/config.pbtxt, REPO/NAME/labels.txt and "
                                        "REPO/NAME/1/model.onnx (batch-dynamic) for Triton's ONNX Runtime "
                                        "backend, with dynamic batching.")
    _model_arguments(triton)
    triton.add_argument("--out", required=True, metavar="REPO", help="the model repository folder (created if "
                                                                     "its parent exists)")
    triton.add_argument("--name", default=None,
                        help="model name = its folder (default: MODEL-DEFENSE[-PRESET], e.g. scc-tiny-digits-ttc)")
    triton.add_argument("--max-batch", type=positive_int, default=8, help="max_batch_size")
    triton.add_argument("--instances", type=positive_int, default=1, help="model instances per device")
    triton.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"],
                        help="instance kind: auto = KIND_AUTO (GPUs when present, else CPU), "
                             "gpu = KIND_GPU, cpu = KIND_CPU")
    triton.add_argument("--tensorrt", action="store_true",
                        help="add ONNX Runtime's TensorRT execution provider as GPU accelerator (FP32)")
    triton.add_argument("--queue-delay-us", type=int, default=500,
                        help="dynamic batching max_queue_delay_microseconds")
    triton.add_argument("--overwrite", action="store_true", help="replace an existing REPO/NAME")
    return parser


def _defended(args: argparse.Namespace):
    """The defended model the arguments name (one SccError line for a bad defense, label or template)."""
    import scc
    from scc.cli import apply_threads, parse_labels, parse_templates
    from scc.defenses import DEFENSES, parse_defense

    name, preset = parse_defense(args.defense)
    if args.preset is not None:
        if "-" in args.defense and preset != args.preset:
            raise SccError(f"--defense {args.defense} and --preset {args.preset} disagree; give one of them")
        name, preset = parse_defense(f"{name}-{args.preset}")
    if not DEFENSES[name].exports:
        raise SccError(f"defense {name!r} cannot be exported: {DEFENSES[name].why_not}")
    labels = parse_labels(args.labels, args.labels_file)
    templates = parse_templates(args.templates)
    try:
        import scc.export  # noqa: F401
    except ImportError as err:
        from scc.env import install_hint

        raise SccError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err}); {install_hint('onnx')}") from None
    apply_threads(args.threads)
    clf = scc.load(args.model, args.pretrained, labels, templates, seed=args.seed)
    return scc.defend(clf, name, preset=preset)


def _export_dtype(args: argparse.Namespace):
    from scc.backends import resolve_dtype

    return resolve_dtype(args.dtype, "cpu")  # the trace runs on the CPU; "auto" is fp32 there


def export_command(args: argparse.Namespace) -> dict:
    from scc.cli import check_output

    check_output(args.out, "--out")  # fail before loading the model
    defended = _defended(args)
    from scc.export import export_onnx

    return export_onnx(defended, args.out, batch_size=args.batch_size, draws_as_inputs=args.draws_as_inputs,
                       opset=args.opset, optimize=args.optimize, dtype=_export_dtype(args))


def triton_command(args: argparse.Namespace) -> dict:
    repo = Path(args.out)
    if not repo.parent.is_dir():  # fail before loading the model
        raise SccError(f"cannot write the repository {repo}: the folder {repo.parent} does not exist")
    from scc.export.triton import export_triton, triton_config

    triton_config("check", {"pixels": [3, 1, 1]}, {"logits": [1]}, args.max_batch, args.instances, args.device,
                  args.tensorrt, queue_delay_us=args.queue_delay_us)  # bad numbers: fail before loading the model
    return export_triton(_defended(args), repo, name=args.name, max_batch=args.max_batch, instances=args.instances,
                         device=args.device, tensorrt=args.tensorrt, queue_delay_us=args.queue_delay_us,
                         draws_as_inputs=args.draws_as_inputs, opset=args.opset, optimize=args.optimize,
                         overwrite=args.overwrite, dtype=_export_dtype(args))


def _describe(info: dict) -> str:
    draws = "inputs " + ", ".join(info["inputs"][1:]) if len(info["inputs"]) > 1 else "drawn in the graph"
    batch = "dynamic" if info["batch_size"] is None else info["batch_size"]
    return (f"{info['bytes'] / 1e6:.1f} MB, {info['dtype']}, {info['nodes']} nodes, opset {info['opset']}, batch {batch}, "
            f"random draws {draws}, {info['seconds']:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():  # skipped optimizer passes are printed below instead
            warnings.filterwarnings("ignore", message=".*skipped optimizer passes.*")
            info = triton_command(args) if args.format == "triton" else export_command(args)
    except SccError as err:
        print(f"scc: error: {' '.join(str(err).split())}", file=sys.stderr)
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
    for skipped in onnx_info.get("skipped_passes", []):
        print(f"skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

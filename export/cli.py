"""`scc export onnx ...`: write a defended classifier to an ONNX file.

    scc export onnx --model scc-tiny-digits --defense scc --preset latency --batch-size 8 --out scc.onnx
    python -m scc.export.cli onnx --model ViT-B-32 --pretrained openai --defense ttc --labels cat,dog --out ttc.onnx

`main(argv)` takes the arguments after `export` and returns the exit status (2 on a user error).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from scc.models import SccError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scc export", description="Export a defended CLIP classifier.")
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = sub.add_parser("onnx", help="the whole defended procedure as one ONNX graph",
                          description="Write the whole defended procedure (counterattack, views, corrective "
                                      "steps and their gradients, logits) as one ONNX file: input `pixels` "
                                      "(B, 3, S, S) float32 in [0,1], output `logits` (B, C).")
    onnx.add_argument("--model", required=True, help="open_clip model name (ViT-B-32, RN50, ...) or scc-tiny-digits")
    onnx.add_argument("--pretrained", default=None,
                      help="open_clip pretrained tag or checkpoint path (default: none; bundled for scc-tiny-digits)")
    onnx.add_argument("--defense", required=True, choices=["ttc", "scc"])
    onnx.add_argument("--preset", default="paper", choices=["paper", "latency"])
    onnx.add_argument("--labels", default=None, help="comma-separated class names (default: the model's own, "
                                                     "scc-tiny-digits only)")
    onnx.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                      help="prompt templates with a {} placeholder (default: 'a photo of a {}.')")
    onnx.add_argument("--batch-size", type=int, default=1, help="the file's fixed batch size (default 1)")
    onnx.add_argument("--draws-as-inputs", action="store_true",
                      help="take the random draws (start, noise) as inputs instead of drawing them in the graph")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.add_argument("--no-optimize", dest="optimize", action="store_false", help="skip the ONNX optimizer passes")
    onnx.add_argument("--out", required=True, help="output .onnx file")
    return parser


def export_command(args: argparse.Namespace) -> dict:
    import scc
    from scc.export import export_onnx

    out = Path(args.out)
    if not out.parent.is_dir():  # fail before loading the model
        raise SccError(f"cannot write {out}: the folder {out.parent} does not exist")
    labels = args.labels.split(",") if args.labels is not None else None
    clf = scc.load(args.model, args.pretrained, labels, args.templates)
    defended = scc.defend(clf, args.defense, preset=args.preset)
    return export_onnx(defended, args.out, batch_size=args.batch_size, draws_as_inputs=args.draws_as_inputs,
                       opset=args.opset, optimize=args.optimize)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = export_command(args)
    except SccError as err:
        print(f"scc export: error: {err}", file=sys.stderr)
        return 2
    draws = "inputs " + ", ".join(info["inputs"][1:]) if len(info["inputs"]) > 1 else "drawn in the graph"
    print(f"wrote {info['path']}: {info['bytes'] / 1e6:.1f} MB, {info['nodes']} nodes, opset {info['opset']}, "
          f"batch {info['batch_size']}, random draws {draws}, {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

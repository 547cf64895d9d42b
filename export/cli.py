"""`scc export onnx ...`: write a defended classifier to an ONNX file.

    scc export onnx --model scc-tiny-digits --defense scc-latency --batch-size 8 --out scc.onnx
    python -m scc.export.cli onnx --model ViT-B-32 --pretrained openai --defense ttc --labels cat,dog --out ttc.onnx

`main(argv)` takes the arguments after `export` and returns the exit status (2 on a user error).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from scc.models import SccError


def build_parser() -> argparse.ArgumentParser:
    from scc.cli import Parser, _labels_args, add_common, positive_int, version

    parser = Parser(prog="scc export", description="Export a defended CLIP classifier.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=Parser)
    onnx = sub.add_parser("onnx", help="the whole defended procedure as one ONNX graph",
                          description="Write the whole defended procedure (counterattack, views, corrective "
                                      "steps and their gradients, logits) as one ONNX file: input `pixels` "
                                      "(B, 3, S, S) float32 in [0,1], output `logits` (B, C).")
    onnx.add_argument("--model", required=True, help="open_clip model name (ViT-B-32, RN50, ...) or scc-tiny-digits")
    onnx.add_argument("--pretrained", default=None,
                      help="open_clip pretrained tag or checkpoint path (default: none; bundled for scc-tiny-digits)")
    onnx.add_argument("--defense", required=True, help="ttc | scc | scc-latency (name-preset, as in the other "
                                                       "commands)")
    onnx.add_argument("--preset", default=None, help="paper | latency (default: the one in --defense, else paper)")
    _labels_args(onnx, "the model's own, scc-tiny-digits only")
    onnx.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                      help="'|'-separated prompt templates, each with one {} (space-separated arguments are "
                           "accepted too) (default: the model's own, 'a photo of a {}.' for open_clip models)")
    onnx.add_argument("--batch-size", type=positive_int, default=1, help="the file's fixed batch size")
    onnx.add_argument("--draws-as-inputs", action="store_true",
                      help="take the random draws (start, noise) as inputs instead of drawing them in the graph")
    onnx.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.add_argument("--no-optimize", dest="optimize", action="store_false", help="skip the ONNX optimizer passes")
    onnx.add_argument("--out", required=True, help="output .onnx file (its folder must exist)")
    onnx.add_argument("--seed", type=int, default=0, help="seed of random weights (--pretrained none)")
    add_common(onnx, json_output=False)
    return parser


def export_command(args: argparse.Namespace) -> dict:
    import scc
    from scc.cli import apply_threads, check_output, parse_labels, parse_templates
    from scc.defenses import DEFENSES, parse_defense

    check_output(args.out, "--out")  # fail before loading the model
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
        from scc.export import export_onnx
    except ImportError as err:
        from scc.env import install_hint

        raise SccError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err}); {install_hint('onnx')}") from None
    apply_threads(args.threads)
    clf = scc.load(args.model, args.pretrained, labels, templates, seed=args.seed)
    defended = scc.defend(clf, name, preset=preset)
    return export_onnx(defended, args.out, batch_size=args.batch_size, draws_as_inputs=args.draws_as_inputs,
                       opset=args.opset, optimize=args.optimize)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        info = export_command(args)
    except SccError as err:
        print(f"scc: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    draws = "inputs " + ", ".join(info["inputs"][1:]) if len(info["inputs"]) > 1 else "drawn in the graph"
    print(f"wrote {info['path']}: {info['bytes'] / 1e6:.1f} MB, {info['nodes']} nodes, opset {info['opset']}, "
          f"batch {info['batch_size']}, random draws {draws}, {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

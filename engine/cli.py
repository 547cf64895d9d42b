"""The `scc` command line: demo, classify, eval, bench, export, train-tiny.

User errors (bad files, unknown models, empty labels, ...) print one line `scc: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models import BUNDLED, SccError, TINY_NAME, bundled_dataset, is_bundled

# How the demo's header names each bundled model's held-out images.
DEMO_DATA = {"digits": "held-out digits (sklearn load_digits test split)",
             "fashion": "held-out Fashion-MNIST test images (the bundled stratified subset)"}


def _labels(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",")]


def _add_model_args(p: argparse.ArgumentParser, default_model: str = TINY_NAME) -> None:
    p.add_argument("--model", default=default_model,
                   help=f"open_clip model name or a bundled model ({', '.join(BUNDLED)}; default: %(default)s)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. openai), a local checkpoint path, or none (random weights)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the defenses' random draws and the attacks")


def cmd_demo(args: argparse.Namespace) -> int:
    from .evaluate import format_table, run

    dataset = bundled_dataset(args.model)
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if not defenses:
        raise SccError("--defenses is empty: name at least one of none, ttc, scc, scc-latency, rtpt")
    report = run(args.model, None, dataset, defenses=defenses,
                 attacks=[("none", 0.0), ("pgd", 1 / 255), ("pgd", 4 / 255)], n_images=args.images,
                 batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.model} on {report['n_images']} {DEMO_DATA[dataset]}, "
              f"PGD-10 against the undefended model, {report['device']}")
        print(format_table(report))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import format_table, parse_eps, run

    attacks = [("none", 0.0)] if args.clean else []
    for name in args.attacks.split(","):
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        attacks += [(name, parse_eps(e)) for e in args.eps.split(",")]
    report = run(args.model, args.pretrained, args.dataset, defenses=args.defenses.split(","), attacks=attacks,
                 n_images=args.images, batch_size=args.batch_size, device=args.device, seed=args.seed,
                 attack_steps=args.steps, progress=not args.quiet,
                 templates=args.templates.split("|") if args.templates else None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from . import defend, load
    from .data import BORDER, read_image
    from .defenses import split_defense_name

    labels = _labels(args.labels)
    if labels is None and not is_bundled(args.model):
        raise SccError(f"--labels is required for {args.model}, e.g. --labels cat,dog,car")
    templates = args.templates.split("|") if args.templates else None
    clf = load(args.model, args.pretrained, labels=labels, templates=templates, device=args.device)
    name, preset = split_defense_name(args.defense)
    defended = defend(clf, name, preset=preset, seed=args.seed)
    border = BORDER[bundled_dataset(args.model)] if is_bundled(args.model) else 0.0
    images, results = [], []
    for path in args.images:
        try:
            images.append((len(results), read_image(path, clf.image_size, border)))
            results.append({"path": path})
        except SccError as err:
            results.append({"path": path, "error": str(err)})
    if images:
        x = torch.stack([img for _, img in images]).to(args.device)
        with torch.no_grad():
            probs = defended(x).softmax(-1).cpu()
        for (row, _), p in zip(images, probs):
            top = p.topk(min(3, len(clf.labels)))
            results[row].update({"label": clf.labels[top.indices[0]], "score": round(top.values[0].item(), 4),
                                 "top": [[clf.labels[i], round(v.item(), 4)] for v, i in zip(top.values, top.indices)]})
    bad = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps({"model": args.model, "defense": args.defense, "results": results}, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: ERROR {r['error']}")
            else:
                print(f"{r['path']}: {r['label']} ({r['score']:.3f})  top: "
                      + ", ".join(f"{l} {s:.3f}" for l, s in r["top"]))
    for r in bad:
        print(f"scc: error: {r['error']}", file=sys.stderr)
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scc", description="Test-time adversarial defenses for CLIP (SCC, TTC, R-TPT)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="a bundled model on its held-out images: clean and PGD accuracy, none/ttc/scc "
                                    "(offline)")
    p.add_argument("--model", choices=list(BUNDLED), default=TINY_NAME,
                   help="bundled model; the demo uses its held-out images (default: %(default)s)")
    p.add_argument("--defenses", default="none,ttc,scc",
                   help="comma-separated: none, ttc, scc, scc-latency, rtpt (default: %(default)s)")
    p.add_argument("--images", type=int, default=None,
                   help="first N held-out images (default: all: 450 digits, 1000 fashion)")
    p.add_argument("--batch-size", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("classify", help="classify image files with a defended zero-shot classifier")
    p.add_argument("images", nargs="+", help="image files (any PIL format; grayscale/RGBA/16-bit are converted)")
    p.add_argument("--labels", default=None,
                   help="comma-separated class names (default for a bundled model: its ten classes)")
    p.add_argument("--templates", default=None, help="'|'-separated prompt templates with {} (default: per model)")
    p.add_argument("--defense", default="scc", help="none | ttc | scc | scc-latency | rtpt (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("eval", help="clean and robust accuracy of defenses on a dataset (TTC protocol)")
    _add_model_args(p)
    p.add_argument("--templates", default=None, help="'|'-separated prompt templates (default: the dataset's)")
    p.add_argument("--dataset", default="digits",
                   help="digits | fashion | fashion-full | fashion-val | imagefolder:PATH | cifar10:ROOT | dtd:ROOT ...")
    p.add_argument("--defenses", default="none,ttc,scc", help="comma-separated, e.g. none,ttc,scc,scc-latency,rtpt")
    p.add_argument("--attacks", default="pgd", help="comma-separated: pgd, cw (none for clean only)")
    p.add_argument("--eps", default="1/255", help="comma-separated attack radii, e.g. 1/255,4/255")
    p.add_argument("--steps", type=int, default=10, help="attack steps (default: %(default)s)")
    p.add_argument("--no-clean", dest="clean", action="store_false", help="skip the clean-accuracy rows")
    p.add_argument("--images", type=int, default=None, help="first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the JSON report to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    sub.add_parser("bench", help="per-image latency of defenses x backends (Table 4); see `scc bench --help`",
                   add_help=False)
    sub.add_parser("export", help="export a defended model (ONNX); see `scc export --help`", add_help=False)
    sub.add_parser("train-tiny", help="retrain a bundled model (--dataset digits|fashion); see `scc train-tiny --help`",
                   add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "bench":
            from .bench import main as bench_main

            return bench_main(argv[1:])
        if argv and argv[0] == "export":
            from .export.cli import main as export_main

            return export_main(argv[1:])
        if argv and argv[0] == "train-tiny":
            from .train_tiny import main as train_main

            train_main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SccError as err:
        print(f"scc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `scc` command line: demo, classify, eval, bench, export, train-tiny.

User errors (bad files, unknown models, empty labels, bad flag values, ...) print one line `scc: error: ...`
and exit 2; nothing is computed before every argument and output path has been checked.

The shared vocabulary of every command lives here (bench, export and train-tiny import it):
    Parser / add_common        argparse with one-line errors, --threads, --quiet, --version, defaults in --help
    positive_int, ...          argparse types that refuse 0 / negative counts with the value in the message
    check_output, write_json   --json PATH (a file) or `-` (stdout), checked before the work starts
    parse_labels, parse_templates, apply_threads
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .models import BUNDLED, SccError, TINY_NAME, bundled_dataset, is_bundled

# How the demo's header names each bundled model's held-out images.
DEMO_DATA = {"digits": "held-out digits (sklearn load_digits test split)",
             "fashion": "held-out Fashion-MNIST test images (the bundled stratified subset)"}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".dib", ".pcx", ".sgi", ".im", ".icns")


def version() -> str:
    from . import __version__

    return f"scc {__version__}"


# ----------------------------------------------------------------------------------------------------------
# Parsers shared by every command
# ----------------------------------------------------------------------------------------------------------
class Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default (unless the help text already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS or action.nargs == 0 or action.required
                or "default" in text.lower()
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are SccErrors: one line `scc: error: ...`, exit 2, no usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if "expected one argument" in message:
            message += " (a value that starts with '-' needs '=', e.g. --eps=-4/255)"
        raise SccError(f"{message} (see `{self.prog} --help`)")


def _int_type(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _int_type(1, "a positive integer")
nonnegative_int = _int_type(0, "an integer >= 0")


def add_common(p: argparse.ArgumentParser, json_output: bool = True, threads_default: int | None = None) -> None:
    """--threads, --quiet, --version (and --json PATH|-) on a command."""
    p.add_argument("--threads", type=positive_int, default=threads_default, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads) and ONNX Runtime; recorded in JSON reports. "
                        "On a machine shared with other work, 1 is often several times faster "
                        + ("(default: torch's own choice, one per core)" if threads_default is None
                           else f"(default: {threads_default})"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines: results, warnings "
                                                        "and errors only")
    p.add_argument("--version", action="version", version=version())
    if json_output:
        p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                       help="write the JSON report to PATH, or to stdout with `-` (a bare --json means `-`); "
                            "the folder must exist; checked before the run (default: no JSON)")


def apply_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads) when given; returns the thread count in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_device_arg(device: str) -> None:
    from .models import check_device

    try:
        check_device(device)
    except SccError as err:
        raise SccError(f"--device {device}: {err}") from None


def check_output(path: str | None, flag: str = "--json", inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written: `-` (stdout) and None pass."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise SccError(f"{flag} {path} is a directory: give a file name, e.g. {flag} {p / 'report.json'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise SccError(f"cannot write {flag} {path}: the folder {parent} does not exist; create it first "
                       f"(mkdir -p {parent}) or choose another path")
    if not parent.is_dir():
        raise SccError(f"cannot write {flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SccError(f"cannot write {flag} {path}: permission denied; choose a writable folder")
    resolved = p.resolve()
    if any(Path(i).resolve() == resolved for i in inputs):
        raise SccError(f"{flag} {path} is also an input file: refusing to overwrite it")
    if p.exists() and p.suffix.lower() in IMAGE_SUFFIXES:
        raise SccError(f"{flag} {path} is an existing image: refusing to overwrite it with a report "
                       f"(did an image name follow a bare {flag}? write {flag} report.json or {flag} -)")


def write_json(report: dict, path: str | None) -> None:
    """The report to `path` (`-`: stdout). The table has been printed before, so a failure loses nothing."""
    if path is None:
        return
    text = json.dumps(report, indent=2)
    if path == "-":
        print(text)
        return
    try:
        Path(path).write_text(text + "\n")
    except OSError as err:
        raise SccError(f"could not write --json {path}: {err.strerror or err}") from None


def parse_labels(labels: str | None, labels_file: str | None) -> list[str] | None:
    """--labels a,b,c or --labels-file FILE (one name a line, so names may contain commas), checked."""
    from .models import check_labels

    if labels is not None and labels_file is not None:
        raise SccError("give either --labels or --labels-file, not both")
    if labels_file is not None:
        path = Path(labels_file)
        if not path.is_file():
            raise SccError(f"--labels-file {labels_file}: no such file")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SccError(f"--labels-file {labels_file}: cannot read it as UTF-8 text ({err})") from None
        names = [l.strip() for l in lines if l.strip() and not l.lstrip().startswith("#")]
        return check_labels(names, "--labels-file")
    if labels is None:
        return None
    return check_labels([t.strip() for t in labels.split(",")], "--labels")


def parse_templates(text: str | Sequence[str] | None) -> list[str] | None:
    """'|'-separated templates (a list of such strings too, for `scc export`'s older space-separated form)."""
    from .models import check_templates

    if text is None:
        return None
    parts = [text] if isinstance(text, str) else list(text)
    templates = [t for part in parts for t in part.split("|")]
    if not any(t.strip() for t in templates):
        raise SccError("--templates is empty: give '|'-separated templates with one {}, e.g. 'a photo of a {}.'")
    return check_templates(templates)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"open_clip model name (ViT-B-32, RN50, ...) or a bundled model "
                                                 f"({', '.join(BUNDLED)}) (default: {TINY_NAME}, the bundled "
                                                 "handwritten-digits model)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (e.g. openai), a local checkpoint path (.safetensors/.pt), or none "
                        "(random weights drawn with --seed) (default: the bundled weights for "
                        f"{TINY_NAME}, random otherwise)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the defenses' random draws, the attacks and "
                                                       "random weights")


def _dtype(args: argparse.Namespace):
    from .backends import resolve_dtype  # lazy: `scc --help` imports no torch

    return resolve_dtype(args.dtype, args.device)


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="image-tower precision: auto (bf16 on CUDA, fp32 on CPU), fp32, "
                   "bf16, fp16 (GPU); the perturbation, its steps and the logits stay fp32 (default: %(default)s)")


def _labels_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--labels", default=None, help=f"comma-separated class names (default: {default})")
    p.add_argument("--labels-file", default=None, metavar="FILE",
                   help="class names, one per line (names may contain commas; # starts a comment) "
                        "(default: use --labels)")


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .evaluate import format_table, run

    check_output(args.json)
    check_device_arg(args.device)
    dataset = bundled_dataset(args.model)
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if not defenses:
        raise SccError("--defenses is empty: name at least one of none, ttc, scc, scc-latency, rtpt")
    apply_threads(args.threads)
    report = run(args.model, None, dataset, defenses=defenses,
                 attacks=[("none", 0.0), ("pgd", 1 / 255), ("pgd", 4 / 255)], n_images=args.images,
                 batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet)
    if args.json != "-":
        print(f"{args.model} on {report['n_images']} {DEMO_DATA[dataset]}, "
              f"PGD-10 against the undefended model, {report['device']}")
        print(format_table(report))
    write_json(report, args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .defenses import parse_defense
    from .evaluate import format_table, parse_eps, run

    check_output(args.json)
    check_device_arg(args.device)
    if args.protocol == "adaptive" or args.out or args.ray:  # scc.adaptive owns the adaptive protocol and --out
        from .adaptive import cli_eval

        args.model = args.model or TINY_NAME
        apply_threads(args.threads)
        return cli_eval(args)
    attacks = [("none", 0.0)] if args.clean else []
    eps = [parse_eps(e) for e in args.eps.split(",")]
    for name in args.attacks.split(","):
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        known = ("pgd", "cw", "apgd-ce", "apgd-dlr", "pgd100", "autoattack")
        if name not in known:
            raise SccError(f"unknown attack {name!r} in --attacks; choose from {', '.join(known)} or none")
        for n in (("apgd-ce", "apgd-dlr") if name == "autoattack" else (name,)):
            attacks += [(n, e) for e in eps]
    if not attacks:
        raise SccError("nothing to evaluate: --attacks none with --no-clean")
    defenses = [d.strip().lower() for d in args.defenses.split(",") if d.strip()]
    if not defenses:
        raise SccError("--defenses is empty; e.g. --defenses none,ttc,scc")
    for d in defenses:
        parse_defense(d)
    templates = parse_templates(args.templates)
    apply_threads(args.threads)
    report = run(args.model or TINY_NAME, args.pretrained, args.dataset, defenses=defenses, attacks=attacks,
                 n_images=args.images, batch_size=args.batch_size, device=args.device, seed=args.seed,
                 attack_steps=args.steps, progress=not args.quiet, templates=templates, backend=args.backend,
                 dtype=_dtype(args))
    if args.json != "-":
        print(format_table(report))  # before the file: a failing write never costs the results
    write_json(report, args.json)
    if report.get("warning"):
        print(report["warning"], file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Image paths, a folder replaced by its image files (sorted); a folder without any stays, to be reported."""
    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            out += files or [path]
        else:
            out.append(path)
    return out


def _looks_like_photo(path: str, x) -> bool:
    """A colour image or one larger than the 8x8-digit scans the bundled model knows."""
    from PIL import Image

    colour = (x.max(0).values - x.min(0).values).mean().item() > 0.04
    try:
        with Image.open(path) as img:
            big = max(img.size) > 128
    except Exception:  # it was readable a moment ago; the size is only a hint
        big = False
    return colour or big


def cmd_classify(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from . import defend, load
    from .data import read_image
    from .defenses import parse_defense

    model = args.model or TINY_NAME
    files = expand_inputs(args.images)
    check_output(args.json, inputs=files)
    check_device_arg(args.device)
    labels = parse_labels(args.labels, args.labels_file)
    if labels is None and not is_bundled(model):
        raise SccError(f"--labels is required for {model} (or --labels-file FILE), e.g. --labels cat,dog,car")
    name, preset = parse_defense(args.defense)
    templates = parse_templates(args.templates)
    threads = apply_threads(args.threads)
    clf = load(model, args.pretrained, labels=labels, templates=templates, device=args.device,
               seed=0 if args.seed is None else args.seed)  # random weights: reproducible even when draws are secret
    defended = defend(clf, name, preset=preset, seed=args.seed, dtype=_dtype(args))
    from .data import BORDER

    border = BORDER[bundled_dataset(model)] if is_bundled(model) else 0.0
    results, photos = [], []
    bar = tqdm(total=len(files), desc=f"classify ({args.defense})", unit="img",
               disable=args.quiet or args.json is not None or len(files) <= args.batch_size)
    for lo in range(0, len(files), args.batch_size):
        images, rows = [], []
        for path in files[lo: lo + args.batch_size]:
            try:
                x = read_image(path, clf.image_size, border)
                images.append(x)
                rows.append(len(results))
                results.append({"path": path})
                if args.model is None and _looks_like_photo(path, x):
                    photos.append(path)
            except SccError as err:
                msg = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
                if Path(path).is_dir():
                    msg = f"{path}: directory holds no image files ({', '.join(IMAGE_SUFFIXES[:6])}, ...)"
                results.append({"path": path, "error": msg})
        if images:
            x = torch.stack(images).to(args.device)
            with torch.no_grad():
                probs = defended(x).softmax(-1).cpu()
            for row, p in zip(rows, probs):
                top = p.topk(min(3, len(clf.labels)))
                results[row].update({"label": clf.labels[top.indices[0]], "score": round(top.values[0].item(), 4),
                                     "top": [[clf.labels[i], round(v.item(), 4)]
                                             for v, i in zip(top.values, top.indices)]})
        bar.update(len(files[lo: lo + args.batch_size]))
    bar.close()
    bad = [r for r in results if "error" in r]
    if args.json is not None:
        write_json({"model": model, "pretrained": args.pretrained, "defense": args.defense, "device": args.device,
                    "seed": args.seed, "threads": threads, "labels": clf.labels, "results": results}, args.json)
    if args.json != "-":
        for r in results:
            if "error" not in r:
                print(f"{r['path']}: {r['label']} ({r['score']:.3f})  top: "
                      + ", ".join(f"{l} {s:.3f}" for l, s in r["top"]))
    for r in bad:  # once, on stderr
        print(f"scc: error: {r['error']}", file=sys.stderr)
    if photos:
        print(f"scc: note: no --model given, so the bundled {TINY_NAME} model (handwritten digits zero..nine "
              f"only) classified {len(photos)} image(s) that look like photos, e.g. {photos[0]}; for photos "
              "pass e.g. --model ViT-B-32 --pretrained openai --labels cat,dog", file=sys.stderr)
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="scc", description="Test-time adversarial defenses for CLIP (SCC, TTC, R-TPT)")
    ap.add_argument("--version", action="version", version=version())
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("demo", help="a bundled model on its held-out images: clean and PGD accuracy, none/ttc/scc "
                                    "(offline)",
                       description="A bundled model on its held-out images: clean and PGD-10 1/255, 4/255 "
                                   "accuracy of none, ttc and scc (attacks made on the undefended model).")
    p.add_argument("--model", choices=list(BUNDLED), default=TINY_NAME,
                   help="bundled model; the demo uses its held-out images")
    p.add_argument("--defenses", default="none,ttc,scc",
                   help="comma-separated: none, ttc, scc, scc-latency, rtpt")
    p.add_argument("--images", type=positive_int, default=None,
                   help="first N held-out images (default: all: 450 digits, 1000 fashion)")
    p.add_argument("--batch-size", type=positive_int, default=150, help="images per batch")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the defenses' draws and the attacks")
    add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("classify", help="classify image files with a defended zero-shot classifier",
                       description="Classify image files (or every image in a folder) with a defended zero-shot "
                                   "classifier. A bad file is named on stderr and the others are still answered "
                                   "(exit 1); a bad argument stops before any work (exit 2).")
    p.add_argument("images", nargs="+", help="image files or folders (any PIL format; grayscale/RGBA/16-bit are "
                                             "converted)")
    _labels_args(p, "the digits zero..nine for the bundled model; required otherwise")
    p.add_argument("--templates", default=None,
                   help="'|'-separated prompt templates, each with one {} (default: the model's own, "
                        "'a photo of a {}.' for open_clip models)")
    p.add_argument("--defense", default="scc", help="none | ttc | scc | scc-latency | rtpt")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    _model_args(p)
    _add_dtype_arg(p)
    add_common(p)
    p.set_defaults(func=cmd_classify, seed=None)  # a served answer: secret per-image draws unless --seed

    p = sub.add_parser("eval", help="clean and robust accuracy of defenses on a dataset (TTC protocol)",
                       description="Clean and robust accuracy of defenses on a dataset (TTC protocol: attacks "
                                   "against the undefended model). eps: write 4/255 (levels of 255) or a pixel "
                                   "fraction below 1 with a decimal point (0.0157); bare integers and values >= 1 "
                                   "are refused as ambiguous.")
    _model_args(p)
    p.add_argument("--templates", default=None, help="'|'-separated prompt templates, each with one {} "
                                                     "(default: the dataset's)")
    p.add_argument("--dataset", default="digits",
                   help="digits | fashion | fashion-full | fashion-val | imagefolder:PATH (one sub-folder per "
                        "class) | cifar10:ROOT | stl10:ROOT | dtd:ROOT ...")
    p.add_argument("--defenses", default="none,ttc,scc", help="comma-separated from none, ttc, scc, scc-latency, rtpt")
    p.add_argument("--attacks", default="pgd", help="comma-separated: pgd, cw, apgd-ce, apgd-dlr, pgd100, "
                   "autoattack (= apgd-ce,apgd-dlr); none for clean only")
    p.add_argument("--eps", default="1/255", help="comma-separated attack radii: 1/255,4/255 or 0.0157 (see above)")
    p.add_argument("--steps", type=positive_int, default=10, help="attack steps")
    p.add_argument("--backend", default="eager", choices=("eager", "compiled", "triton", "onnx"),
                   help="how the defenses run (scc.backends)")
    _add_dtype_arg(p)
    p.add_argument("--no-clean", dest="clean", action="store_false", help="skip the clean-accuracy rows")
    p.add_argument("--images", type=positive_int, default=None, help="first N images (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    add_common(p)
    p.add_argument("--protocol", default="paper", choices=("paper", "adaptive"),
                   help="paper: attacks on the undefended classifier (TTC/SCC reproduction, not a robustness claim); "
                        "adaptive: attacks through the defense, scored with known and fresh draws (scc.adaptive)")
    p.add_argument("--out", default=None, help="folder for report.json, report.md and the PNG plots")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="adaptive protocol: shard the images over Ray tasks (pip install 'scc-defense[ray]')")
    p.add_argument("--workers", default="auto", metavar="auto|N",
                   help="adaptive protocol: local worker processes, each with --threads threads (default auto: "
                        "usable CPU cores // threads, 1 on a GPU); the merged report equals a one-process run")
    p.add_argument("--adaptive-attacks", default=None,
                   help="adaptive protocol: comma-separated subset of pgd,apgd-ce,apgd-dlr,eot-pgd,bpda-pgd,"
                        "transfer-nocorrect,square (default: all)")
    p.add_argument("--queries", type=positive_int, default=1000, help="Square's query budget")
    p.add_argument("--eot-samples", type=positive_int, default=8, help="EOT draws per step")
    p.add_argument("--sanity", action="store_true",
                   help="adaptive protocol: the PGD-20-at-16/255 check on every image (default: the first 32)")
    p.set_defaults(func=cmd_eval)

    sub.add_parser("bench", help="per-image latency of defenses x backends (Table 4); see `scc bench --help`",
                   add_help=False)
    sub.add_parser("export", help="export a defended model (ONNX); see `scc export --help`", add_help=False)
    sub.add_parser("serve", help="serve a defended model over HTTP (Ray Serve); see `scc serve --help`",
                   add_help=False)
    sub.add_parser("loadtest", help="closed-loop load test of a running `scc serve`; see `scc loadtest --help`",
                   add_help=False)
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
        if argv and argv[0] == "serve":
            from .serve import main as serve_main

            return serve_main(argv[1:])
        if argv and argv[0] == "loadtest":
            from .loadtest import main as loadtest_main

            return loadtest_main(argv[1:])
        if argv and argv[0] == "train-tiny":
            from .train_tiny import main as train_main

            return train_main(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SccError as err:
        print(f"scc: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help / --version
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

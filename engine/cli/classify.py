"""`scc classify`: image files (or every image in a folder) through a defended zero-shot classifier. Each file goes
through the model's own preprocessing (`clf.preprocess`, scc.images), the one `scc serve` and `scc eval` use. A bad
file is named on stderr and the others are still answered (exit 1); no usable file, or a bad argument, is exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import SccError
from .args import (DEFENSE_CHOICES, TINY_NAME, add_common, add_dtype_arg, add_labels_args, add_model_args,
                   add_templates_arg, apply_threads, check_device_arg, check_output, parse_labels, parse_templates,
                   positive_int, write_json)


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="classify image files with a defended zero-shot classifier",
                       description=__doc__)
    p.add_argument("images", nargs="+", help="image files or folders (any PIL format; grayscale/RGBA/16-bit are "
                                             "converted)")
    add_labels_args(p, "the digits zero..nine for the bundled model; required otherwise")
    add_templates_arg(p, "the model's own, 'a photo of a {}.' for open_clip models")
    p.add_argument("--defense", default="scc", help=DEFENSE_CHOICES.replace(", ", " | "))
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    add_model_args(p, seed_default=None, seed_help="seed of the defense's draws (default: a fresh secret seed) and "
                                                   "of random weights (default 0)")
    add_dtype_arg(p)
    add_common(p)
    p.set_defaults(func=run)


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Image paths, a folder replaced by its image files (sorted); a folder without any stays, to be reported."""
    from ..images import IMAGE_SUFFIXES

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


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..defenses import defend, parse_defense
    from ..models import is_bundled, load
    from ..precision import resolve_dtype

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
    defended = defend(clf, name, preset=preset, seed=args.seed, dtype=resolve_dtype(args.dtype, args.device))
    results, photos = [], []
    bar = tqdm(total=len(files), desc=f"classify ({args.defense})", unit="img",
               disable=args.quiet or args.json is not None or len(files) <= args.batch_size)
    for lo in range(0, len(files), args.batch_size):
        images, rows = [], []
        for path in files[lo: lo + args.batch_size]:
            try:
                x = clf.preprocess.file(path)
                images.append(x)
                rows.append(len(results))
                results.append({"path": path})
                if args.model is None and _looks_like_photo(path, x):
                    photos.append(path)
            except SccError as err:
                msg = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
                if Path(path).is_dir():
                    from ..images import IMAGE_SUFFIXES

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
        from ..provenance import hardware

        write_json({"model": model, "pretrained": args.pretrained, "defense": name, "spec": defended.spec,
                    "device": args.device, "seed": args.seed, "threads": threads, "hardware": hardware(args.device),
                    "labels": clf.labels, "results": results}, args.json)
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
    return (2 if len(bad) == len(results) else 1) if bad else 0

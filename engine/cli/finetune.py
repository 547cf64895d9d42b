"""`scc finetune`: fine-tune a CLIP vision encoder with CLIP-FT, TeCoA, PMG-AFT or FARE (scc.train.finetune).

    scc finetune --method tecoa --eps 1/255 --data digits --out robust/           one model, into --out
    torchrun --nproc-per-node 2 -m scc.cli finetune --method fare --data digits --out robust/    the same, DDP
    scc finetune --testbed digits,fashion --method all                             the cached testbed models

The checkpoint (`<model>-<method>.safetensors`, a whole open_clip state dict) loads in every command with
`--pretrained PATH` (and `--model` the base model); `<model>-<method>.meta.json` beside it records the method,
eps, steps, data, seed, versions and the loss of every epoch. Each preset is its source's setting at eps_train
1/255 (`--eps 1/255`, the paper's Table 1) or 4/255; --epochs, --batch-size and --lr override the testbed
schedule. An interrupted run (Ctrl-C) keeps its last finished epoch: start the same command again to resume.
--data: digits | fashion (the bundled testbeds' training splits; fashion needs the Debian package
dataset-fashion-mnist, except --images 2560 --seed 0, the testbed subset, which ships with scc) | imagefolder:PATH.

--testbed builds the robust versions of the bundled models that `scc eval --defenses clip-ft,tecoa,pmg-aft,fare,...`
uses, into the cache (~/.cache/scc or $SCC_CACHE_DIR); models already there are only listed.
"""
from __future__ import annotations

import argparse

from ..errors import SccError
from .args import add_common, add_model_args, apply_threads, check_folder, positive_float, positive_int, status
from .interrupts import interruptible

METHOD_CHOICES = "clip-ft | tecoa | pmg-aft | fare"


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help=f"fine-tune a vision encoder ({METHOD_CHOICES})", description=__doc__)
    p.add_argument("--method", required=True,
                   help=f"{METHOD_CHOICES}; with --testbed also several (comma-separated, tecoa-eps4 for the 4/255 "
                        "preset) or all")
    p.add_argument("--eps", default=None,
                   help="eps_train: 1/255 (the paper's Table 1 preset) or 4/255 (default: 1/255; CLIP-FT has no "
                        "attack)")
    add_model_args(p, seed_help="seed of the batch order, the attack starts and random weights")
    p.add_argument("--data", default=None,
                   help="training data: digits | fashion | imagefolder:PATH | <torchvision name>:ROOT (its "
                        "training split, e.g. cifar10:ROOT, dtd:ROOT) (default: a bundled model's own testbed, "
                        "else required)")
    p.add_argument("--images", type=positive_int, default=None, help="a stratified subset of N training images "
                                                                      "(default: all)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the preset's, 10)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch over all processes (default: the preset's, 128)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--reduction", choices=("official", "mean"), default=None,
                   help="PMG-AFT's KL terms: official = summed over the batch (the official code), mean = batch mean "
                        "(default: official)")
    p.add_argument("--out", default="finetune-out", metavar="DIR", help="folder for the checkpoint and its meta")
    p.add_argument("--testbed", default=None, metavar="digits,fashion|all",
                   help="build the cached robust testbed models instead (what scc eval's fine-tuned columns use)")
    add_common(p, json_output=False, threads_default=1)
    p.set_defaults(func=run)


def _preset(method: str, eps_text: str | None) -> tuple[str, float | None]:
    """(preset, eps override or None) of --eps for `method`."""
    from ..eval.options import parse_eps

    if eps_text is None:
        return "eps1", None
    eps = parse_eps(eps_text)
    if method == "clip-ft":
        raise SccError("clip-ft fine-tunes on clean images: it takes no --eps")
    if abs(eps - 1 / 255) < 1e-9:
        return "eps1", None
    if abs(eps - 4 / 255) < 1e-9:
        return "eps4", None
    if eps <= 0:
        raise SccError(f"--eps must be positive for {method}, got {eps_text}")
    return ("eps4" if eps > 2.5 / 255 else "eps1"), eps  # another radius: the nearer preset's attack, that eps


def run(args: argparse.Namespace) -> int:
    if args.testbed is not None:
        return _testbed(args)
    from ..models import BUNDLED, check_model_name
    from ..train.finetune import METHODS, finetune, stem_of

    method = args.method.strip().lower()
    if method not in METHODS:
        raise SccError(f"unknown --method {args.method!r}; choose from {METHOD_CHOICES} (several or all only with "
                       "--testbed)")
    preset, eps = _preset(method, args.eps)
    model = args.model or "scc-tiny-digits"
    check_model_name(model)
    data = args.data or BUNDLED.get(model)
    if data is None:
        raise SccError(f"--data is required for {model} (digits | fashion | imagefolder:PATH)")
    out = check_folder(args.out, parents=True)
    apply_threads(args.threads)
    stem = stem_of(model, method, preset)
    log = lambda line: status(args, line)

    def save(report: dict) -> list[str]:
        from pathlib import Path

        return [report["resume"]] if report.get("epochs") and Path(report["resume"]).is_file() else []

    with interruptible("epochs", save, unsaved="no epoch had finished; nothing to resume from") as keep:
        meta = finetune(model, method, preset, data=data, out=out, pretrained=args.pretrained, seed=args.seed,
                        images=args.images, device=args.device, progress=not args.quiet, log=log, keep=keep,
                        eps=eps, epochs=args.epochs, batch=args.batch_size, lr=args.lr, reduction=args.reduction)
    if meta.get("checkpoint"):  # rank 0
        status(args, f"wrote {out / meta['checkpoint']} and {out / (stem + '.meta.json')} "
                     f"({meta['train_s']:.0f} s of training); use it with --model {model} "
                     f"--pretrained {out / meta['checkpoint']}")
    return 0


def _testbed(args: argparse.Namespace) -> int:
    from ..models import BUNDLED
    from ..train.finetune import method_labels, parse_method
    from ..train.robust import testbed_model

    names = {v: k for k, v in BUNDLED.items()}
    wanted = [t.strip().lower() for t in args.testbed.split(",") if t.strip()]
    wanted = list(names) if wanted == ["all"] else wanted
    bad = [t for t in wanted if t not in names]
    if bad or not wanted:
        raise SccError(f"unknown --testbed {bad or args.testbed!r}; choose from {', '.join(names)} or all")
    if args.eps is not None or args.data is not None or args.images is not None or args.pretrained is not None \
            or any(v is not None for v in (args.epochs, args.batch_size, args.lr, args.reduction)):
        raise SccError("--testbed builds the fixed testbed recipes: it takes no --eps, --data, --images, "
                       "--pretrained, --epochs, --batch-size, --lr or --reduction (name a preset: tecoa-eps4)")
    labels = method_labels() if args.method.strip().lower() == "all" else \
        [t.strip().lower() for t in args.method.split(",") if t.strip()]
    for label in labels:
        parse_method(label)  # every label checked before the first build
    apply_threads(args.threads)
    with interruptible("models", lambda report: [], unsaved="each finished model is in the cache") as keep:
        done: list[str] = []
        keep(lambda: ({}, len(done), len(wanted) * len(labels), []))
        for testbed in wanted:
            for label in labels:
                path, meta = testbed_model(names[testbed], label, progress=not args.quiet,
                                           log=lambda line: status(args, line))
                done.append(str(path))
                print(f"{names[testbed]} {label}: {path} ({meta.get('train_s', 0):.0f} s of training)",
                      flush=True)
    return 0

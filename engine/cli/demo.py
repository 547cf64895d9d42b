"""`scc demo`: a bundled model on its held-out images: clean and PGD-10 (1/255, 4/255) accuracy of a few defenses,
the attacks made on the undefended model (the paper's protocol)."""
from __future__ import annotations

import argparse

from .args import (BUNDLED, DEFENSE_CHOICES, TINY_NAME, add_common, add_device_arg, apply_threads, check_device_arg,
                   check_output, positive_int, seed_int, write_json)

# How the demo's header names each bundled model's held-out images.
DEMO_DATA = {"digits": "held-out digits (sklearn load_digits test split)",
             "fashion": "held-out Fashion-MNIST test images (the bundled stratified subset)"}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a bundled model on its held-out images: clean and PGD accuracy, none/ttc/scc "
                                    "(offline)",
                       description="A bundled model on its held-out images: clean and PGD-10 1/255, 4/255 "
                                   "accuracy of none, ttc and scc (attacks made on the undefended model).")
    p.add_argument("--model", choices=list(BUNDLED), default=TINY_NAME,
                   help="bundled model; the demo uses its held-out images")
    p.add_argument("--defenses", default="none,ttc,scc", help=f"comma-separated: {DEFENSE_CHOICES}")
    p.add_argument("--images", type=positive_int, default=None,
                   help="first N held-out images (default: all: 450 digits, 1000 fashion)")
    p.add_argument("--batch-size", type=positive_int, default=150, help="images per batch")
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the defenses' draws and the attacks")
    # one thread: the bundled models' matmuls are too small to split, and a second OpenMP thread that waits for a
    # busy core stalls every op (the demo ran 4x slower with 2 threads than with 1 on the 2-core CI machine)
    add_common(p, threads_default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..defenses import parse_defenses
    from ..eval.paper import format_table, run as evaluate
    from ..models import bundled_dataset

    check_output(args.json)
    check_device_arg(args.device)
    dataset = bundled_dataset(args.model)
    defenses = parse_defenses(args.defenses)
    apply_threads(args.threads)
    report = evaluate(args.model, None, dataset, defenses=defenses,
                      attacks=[("none", 0.0), ("pgd", 1 / 255), ("pgd", 4 / 255)], n_images=args.images,
                      batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet)
    if args.json != "-":
        print(f"{args.model} on {report['n_images']} {DEMO_DATA[dataset]}, "
              f"PGD-10 against the undefended model, {report['device']}")
        print(format_table(report))
    write_json(report, args.json)
    return 0

"""`scc train-tiny`: retrain a bundled tiny CLIP (digits -> scc-tiny-digits, fashion -> scc-tiny-fashion) on its
training images only (scc.train.tiny). By default the weights go to ./scc-tiny-out/; only --replace-bundled
overwrites the model inside the installed package. One CPU thread trains such tiny steps faster than two."""
from __future__ import annotations

import argparse

from ..errors import SccError
from .args import add_common, apply_threads, check_folder, positive_int, seed_int

RECIPE_NAMES = {"digits": "scc-tiny-digits", "fashion": "scc-tiny-fashion"}


def add_parser(sub) -> None:
    p = sub.add_parser("train-tiny", help="retrain a bundled model (--dataset digits|fashion)", description=__doc__)
    p.add_argument("--dataset", choices=sorted(RECIPE_NAMES), default="digits",
                   help="digits -> scc-tiny-digits, fashion -> scc-tiny-fashion")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the recipe's: "
                                                                      "digits 40, fashion 4)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initialisation, batches and augmentation")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the weights, config and meta (default: ./scc-tiny-out)")
    p.add_argument("--replace-bundled", action="store_true",
                   help="overwrite the bundled model inside the installed package instead of writing to --out")
    add_common(p, json_output=False, threads_default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.tiny import DEFAULT_OUT, bundled_dir, train

    if args.replace_bundled and args.out is not None:
        raise SccError("give either --out DIR or --replace-bundled, not both")
    out = bundled_dir() if args.replace_bundled else check_folder(args.out or str(DEFAULT_OUT))
    apply_threads(args.threads)
    train(args.epochs, args.seed, out, verbose=not args.quiet, dataset=args.dataset)
    if not args.replace_bundled and not args.quiet:
        name = RECIPE_NAMES[args.dataset]
        print(f"use it with: scc classify IMG --model {name} --pretrained {out / (name + '.safetensors')} "
              "(the bundled model is unchanged; --replace-bundled overwrites it)")
    return 0

"""`scc eval`: clean and robust accuracy of defenses on a dataset, one parser and one path into both protocols.

    --protocol paper      attacks on the undefended classifier, then each defense (scc.eval.paper; the TTC/SCC
                          reproduction protocol, not a robustness claim)
    --protocol adaptive   attacks through the defense, scored with known and fresh draws (scc.eval.adaptive)

--dtype, --templates, --attacks, --threads and --backend mean the same in both and reach the run: the image tower's
precision, the prompt templates, the protocol's attacks, torch's threads (per worker process in the adaptive
protocol), and the backend that runs the defense (in the adaptive protocol the attacks differentiate through the
eager module at --dtype; the backend scores the adversarial images). eps: write 4/255 (levels of 255) or a pixel
fraction below 1 with a decimal point (0.0157); bare integers and values >= 1 are refused as ambiguous.

Several datasets (--dataset digits,fashion, paper protocol) give the paper's Table 1 layout: per dataset and on
average, each defense's clean (Acc) and robust (Rob) accuracy and its difference to the undefended model. Without
--model each dataset is evaluated with the bundled model trained for it (digits: scc-tiny-digits, fashion:
scc-tiny-fashion).

--defenses takes labels with config overrides for ablations: scc:semantic=off:spatial=off (SCC with both modules
off), scc-latency:steps=2, scc:warmup.steps=1, ttc:eps=2/255; booleans on/off, tuples joined by '|'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SccError
from .args import (DEFENSE_CHOICES, TINY_NAME, add_common, add_dtype_arg, add_model_args, add_templates_arg,
                   apply_threads, check_device_arg, check_folder, check_output, parse_templates, positive_int,
                   status)
from .interrupts import interruptible, write_json_to

# (scc.eval.options.describe_attacks says the same; not imported here: the parser is built without torch)
PAPER_HELP = ("pgd, cw, pgd100, apgd-ce, apgd-dlr, apgd-t, fab-t, square, apgd (= TTC's AutoAttack subset: "
              "apgd-ce then apgd-dlr), autoattack (= standard AutoAttack: apgd-ce, apgd-t, fab-t, square(5000))")
ADAPTIVE_HELP = "pgd, apgd-ce, apgd-dlr, apgd-t, fab-t, eot-pgd, bpda-pgd, transfer-nocorrect, square, surrogate-pgd"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="clean and robust accuracy of defenses on a dataset (paper or adaptive protocol)",
                       description=__doc__)
    add_model_args(p)
    add_templates_arg(p, "the dataset's; a bundled model's own")
    p.add_argument("--dataset", default="digits",
                   help="digits | fashion | fashion-full | fashion-val | imagefolder:PATH (one sub-folder per "
                        "class) | cifar10:ROOT | stl10:ROOT | dtd:ROOT ...; several, comma-separated, give the "
                        "Table 1 layout (paper protocol)")
    p.add_argument("--defenses", default="none,ttc,scc",
                   help=f"comma-separated from {DEFENSE_CHOICES}, each optionally with config overrides "
                        "(scc:semantic=off:spatial=off); fine-tuned columns of a bundled model: clip-ft, tecoa, "
                        "pmg-aft, fare (-eps4: eps_train 4/255), and test-time defenses on them: fare+ttc")
    p.add_argument("--protocol", default="paper", choices=("paper", "adaptive"),
                   help="paper: attacks on the undefended classifier (TTC/SCC reproduction, not a robustness claim); "
                        "adaptive: attacks through the defense, scored with known and fresh draws")
    p.add_argument("--attacks", default=None,
                   help=f"comma-separated attacks of the protocol; paper: {PAPER_HELP}, or none for clean only "
                        f"(default: pgd); adaptive: {ADAPTIVE_HELP} (default: all but apgd-t and fab-t)")
    p.add_argument("--adaptive-attacks", default=None, help="the same as --attacks with --protocol adaptive")
    p.add_argument("--eps", default="1/255", help="comma-separated attack radii: 1/255,4/255 or 0.0157 (see above)")
    p.add_argument("--steps", type=positive_int, default=10, help="paper protocol: PGD / CW steps")
    p.add_argument("--backend", default="eager", choices=("eager", "compiled", "triton", "onnx"),
                   help="how the defenses run (scc.backends); adaptive protocol: the backend that scores")
    add_dtype_arg(p)
    p.add_argument("--no-clean", dest="clean", action="store_false", help="paper protocol: skip the clean rows")
    p.add_argument("--images", type=positive_int, default=None, help="first N images (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    add_common(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for report.json, report.md and the PNG plots (created if missing)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="adaptive protocol: shard the images over Ray tasks (pip install 'scc-defense[ray]')")
    p.add_argument("--workers", default="auto", metavar="auto|N",
                   help="adaptive protocol: local worker processes, each with --threads threads (default auto: "
                        "usable CPU cores // threads, 1 on a GPU); the merged report equals a one-process run")
    p.add_argument("--queries", type=positive_int, default=1000, help="adaptive protocol: Square's query budget")
    p.add_argument("--eot-samples", type=positive_int, default=8, help="adaptive protocol: EOT draws per step")
    p.add_argument("--sanity", action="store_true",
                   help="adaptive protocol: the PGD-20-at-16/255 check on every image (default: the first 32)")
    p.set_defaults(func=run)


def _workers(text: str, device: str, threads: int) -> int:
    from ..eval.sharding import default_workers

    if text == "auto":
        return max(1, default_workers(device) // threads)
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if not 1 <= workers <= 1024:
        raise SccError(f"--workers takes auto or a number of processes in 1..1024, got {text!r}")
    return workers


def _datasets(text: str, model: str | None) -> list[tuple[str, str]]:
    """(dataset, model) pairs of --dataset: --model for all, else each dataset's own bundled model."""
    from ..models import BUNDLED

    names = [d.strip() for d in str(text).split(",") if d.strip()]
    if not names:
        raise SccError("no dataset given; e.g. --dataset digits or --dataset digits,fashion")
    if len(set(names)) != len(names):
        raise SccError(f"a dataset is listed twice in --dataset {text}")
    if model:
        return [(d, model) for d in names]
    family = lambda d: "fashion" if d.lower().startswith("fashion") else d.partition(":")[0].lower()
    return [(d, next((m for m, ds in BUNDLED.items() if ds == family(d)), TINY_NAME)) for d in names]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import require_extra
    from ..eval.options import parse_attacks, parse_eps_list
    from ..precision import check_dtype_on_device, resolve_dtype

    # every argument, extra and output path is checked before any work
    adaptive = args.protocol == "adaptive"
    if args.adaptive_attacks is not None:
        if not adaptive:
            raise SccError("--adaptive-attacks belongs to --protocol adaptive; the paper protocol takes --attacks")
        if args.attacks is not None and args.attacks != args.adaptive_attacks:
            raise SccError("--attacks and --adaptive-attacks disagree; give one of them")
        args.attacks = args.adaptive_attacks
    if args.ray and not adaptive:
        raise SccError("--ray shards the adaptive protocol: add --protocol adaptive (the paper protocol runs in one "
                       "process)")
    check_output(args.json)
    check_device_arg(args.device)
    pairs = _datasets(args.dataset, args.model)
    if len(pairs) > 1 and adaptive:
        raise SccError("several datasets (the Table 1 layout) run in the paper protocol; run the adaptive protocol "
                       "once per dataset")
    defenses, tuned = _defenses_and_backbones(args.defenses)
    if len(tuned) > 1 and adaptive:
        raise SccError(f"the adaptive protocol takes one fine-tuned model per run, got {', '.join(tuned)}: e.g. "
                       "--defenses fare,fare+ttc,fare+scc")
    if tuned and adaptive and any("+" not in d and d not in tuned for d in defenses):
        raise SccError("with a fine-tuned model the adaptive protocol runs its rows only (fare, fare+ttc, ...): the "
                       "original model's rows are a separate run")
    if tuned and args.pretrained:
        raise SccError("the fine-tuned columns are built from the bundled weights: drop --pretrained")
    eps_list = parse_eps_list(args.eps)
    attacks = parse_attacks(args.attacks, args.protocol)
    templates = parse_templates(args.templates)
    dtype = resolve_dtype(args.dtype, args.device)
    check_dtype_on_device(dtype, args.device)
    if not attacks and not (args.clean and not adaptive):
        raise SccError("nothing to evaluate: --attacks none" + (" with --no-clean" if not adaptive else ""))
    if args.out:
        require_extra("plots", ["matplotlib"], what="--out (its plots)")
    if args.ray:
        require_extra("ray", what="--ray")
    if args.backend == "onnx":
        require_extra("onnx", what="--backend onnx")
    out = check_folder(args.out, parents=True) if args.out else None
    apply_threads(args.threads)
    keep_partial = lambda report: _save(args, report, out, announce=False)  # an interrupted run's report

    if not adaptive:
        from ..eval.paper import run as evaluate, run_datasets

        runs = ([("none", 0.0)] if args.clean else []) + [(a, e) for a in attacks for e in eps_list]
        backbones, notes = _robust_models(args, pairs, tuned)
        common = dict(pretrained=args.pretrained, defenses=defenses, attacks=runs, n_images=args.images,
                      batch_size=args.batch_size, device=args.device, seed=args.seed, attack_steps=args.steps,
                      progress=not args.quiet, templates=templates, backend=args.backend, dtype=dtype)
        with interruptible("rows", keep_partial, total=len(pairs) * len(runs) * len(defenses)) as keep:
            if len(pairs) == 1:
                report = evaluate(pairs[0][1], dataset=pairs[0][0], keep=keep,
                                  backbones=backbones.get(pairs[0][1]), **common)
                if notes:
                    report["notes"] = notes
            else:
                report = run_datasets(pairs, log=lambda line: status(args, f"eval: {line}"), keep=keep,
                                      backbones=backbones, notes=notes, **common)
    else:
        model, dataset = pairs[0][1], pairs[0][0]
        from ..eval.adaptive import evaluate
        from ..eval.suite import Suite

        pretrained, reference, inner = args.pretrained, None, defenses
        if tuned:  # one fine-tuned model: its checkpoint, TTC's gate on the frozen original (the bundled weights)
            backbones, notes = _robust_models(args, pairs, tuned)
            pretrained, reference = backbones[model][tuned[0]]["pretrained"], {"pretrained": None}
            inner = [d.partition("+")[2] or "none" for d in defenses]

        threads = torch.get_num_threads() if args.threads is not None else 1
        workers = _workers(args.workers, args.device, threads)
        suite = Suite(attacks=tuple(attacks), queries=args.queries, eot_k=args.eot_samples,
                      sanity_images=(args.images or 10**9) if args.sanity else 32)
        with interruptible("images", keep_partial, total=args.images) as keep:
            report = evaluate(model, pretrained, dataset, defenses=inner, eps_list=eps_list,
                              n_images=args.images, batch_size=args.batch_size, device=args.device, seed=args.seed,
                              suite=suite, progress=not args.quiet, templates=templates, ray_address=args.ray,
                              log=lambda line: print(line, file=sys.stderr, flush=True), workers=workers,
                              threads=threads, dtype=dtype, backend=args.backend, keep=keep, tau_reference=reference,
                              backbone=tuned[0] if tuned else None)
        if tuned:
            report["backbones"] = {tuned[0]: backbones[model][tuned[0]]["provenance"]}
            report["notes"] = notes
    _save(args, report, out)
    return 0


def _defenses_and_backbones(text: str) -> tuple[list[str], list[str]]:
    """--defenses with fine-tuned models: 'none,fare,ttc,fare+ttc' -> (['none', 'fare', 'ttc', 'fare+ttc'],
    ['fare']). A fine-tuned model's column is its label (clip-ft, tecoa, tecoa-eps4, pmg-aft, fare, fare-eps4); a
    test-time defense on it is joined with '+'. One SccError for every bad spec."""
    from ..defenses import parse_defenses
    from ..train.finetune import method_label, method_labels, parse_method

    specs = [d.strip() for d in str(text).split(",") if d.strip()]
    plain = [s for s in specs if "+" not in s and s.lower() not in method_labels()]
    canon = dict(zip(plain, parse_defenses(plain))) if plain else {}
    out, tuned, bad = [], [], []
    for spec in specs:
        if spec in canon:
            out.append(canon[spec])
            continue
        head, _, rest = spec.partition("+")
        try:
            label = method_label(*parse_method(head))
        except SccError as err:
            bad.append(f"{spec}: {err}")
            continue
        inner = parse_defenses([rest])[0] if rest.strip() else "none"
        out.append(label if inner == "none" else f"{label}+{inner}")
        tuned.append(label)
    if bad:
        raise SccError("; ".join(bad))
    if not out:
        raise SccError("no defense given (comma-separated)")
    if len(set(out)) != len(out):
        raise SccError(f"a defense is listed twice in {', '.join(out)}: each spec names one column of the report")
    return out, list(dict.fromkeys(tuned))


def _robust_models(args: argparse.Namespace, pairs: list[tuple[str, str]], tuned: list[str]
                   ) -> tuple[dict, list[str]]:
    """{model: {label: {"pretrained", "provenance"}}} of the fine-tuned columns (the cached testbed models, built
    once when missing) and the notes the report states."""
    if not tuned:
        return {}, []
    from ..train.robust import IN_DISTRIBUTION, provenance, testbed_model

    out: dict = {}
    for _, model in pairs:
        for label in tuned:
            path, meta = testbed_model(model, label, progress=not args.quiet, log=lambda line: status(args, line))
            status(args, f"eval: fine-tuned {label} of {model}: {path}")
            out.setdefault(model, {})[label] = {"pretrained": str(path), "provenance": provenance(meta, path)}
    notes = [IN_DISTRIBUTION,
             "Fine-tuned columns are attacked white-box on their own fine-tuned model; test-time columns on the "
             "original model; 'X+ttc' runs TTC on fine-tuned model X and takes TTC's tau gate from the frozen "
             "original (TTC's code for fine-tuned victims). Provenance of every fine-tuned model: 'backbones' in "
             "each dataset's report."]
    return out, notes


def _table(report: dict) -> str:
    from ..eval.paper import format_table
    from ..eval.report import format_adaptive_table, format_table1

    if report.get("layout") == "table1":
        return format_table1(report)
    if report["protocol"] == "adaptive":
        return format_adaptive_table(report) + "\n" + "\n".join(report["sanity"])
    return format_table(report)


def _save(args: argparse.Namespace, report: dict, out: Path | None, announce: bool = True) -> list[str]:
    """The table on stdout (unless --json -), the report to --json and --out; where it went. A finished run and
    an interrupted one (scc.cli.interrupts) are written the same way."""
    if args.json != "-":
        print(_table(report), flush=True)  # before any file: a failing write never costs the results
    if report.get("warning"):
        print(report["warning"], file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
    places = write_json_to(report, args.json)
    if out is not None:
        from ..eval.report import write_report

        written = write_report(report, out)
        if announce:
            status(args, "wrote " + ", ".join(str(p) for p in written))
        places.append(f"{out}/")
    return places

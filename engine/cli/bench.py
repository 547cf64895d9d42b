"""`scc bench`: per-image latency of defenses x backends x dtypes on one model, SCC Table 4 style.

    scc bench --model ViT-B-32 --pretrained none --defenses ttc,scc-latency,scc,rtpt \\
        --backends eager,compiled --dtype fp32,bf16 --batch-size 1,8 --images 8 --threads 2 --json out.json
    scc bench --explain                       # encoder passes per image, counted, vs spec section 5
    scc bench --from-benchmark-json FILE      # the same table from `pytest benchmarks/ --benchmark-json`

Defense names: `none`, `ttc`, `scc`, `rtpt`, and `name-preset` (e.g. `scc-latency`). Labels: a bundled model uses
its own classes and template on its held-out images; any other model uses DTD's 47 classes with "A surface with a
{} texture." on uniform random pixels (or `--dataset SPEC` for real images, with that dataset's classes and
template).

Timing: the images are split into batches of --batch-size and each defense draws its randomness for every batch
before timing, so every backend replays identical draws (`top1_agreement` compares its top-1 with the eager fp32
backend's on them). --warmup calls on the first batch are excluded; CUDA is synchronised inside the timed region;
seconds per image = call seconds / batch size; median and p20/p80 over the timed calls, interleaved across the
rows. A backend's compile/capture/export time is reported apart (`compile_s`). Each batch size of
`--batch-size 1,8` gets its own rows, measured one batch size after the other.

With TTC among the defenses, the official TTC procedure (an independent eager fp32 implementation of the official
code's order of passes, scc.bench.official) runs interleaved with the TTC rows on the same draws as the row
"ttc-official"; every row's `speedup_vs_official` is measured against it in the same run.
"""
from __future__ import annotations

import argparse
import math
import sys

from ..errors import SccError
from .args import (DEFENSE_CHOICES, TINY_NAME, add_common, add_dtype_arg, add_labels_args, add_model_args,
                   add_templates_arg, apply_threads, check_device_arg, check_output, nonnegative_int,
                   parse_labels, parse_templates, positive_int, status, write_json)
from .interrupts import interruptible, partial_report, write_json_to

DEFAULT_DEFENSES = "none,ttc,scc-latency,scc,rtpt"


def batch_sizes(text: str) -> list[int]:
    """An argparse type: '1,8' -> [1, 8] (positive integers, each once)."""
    sizes = [positive_int(t.strip()) for t in text.split(",") if t.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}")
    return list(dict.fromkeys(sizes))


batch_sizes.__name__ = "batch sizes"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="per-image latency of defenses x backends x dtypes (Table 4)",
                       description=__doc__)
    add_model_args(p, model_default=TINY_NAME,
                   seed_help="seed of the draws, the random pixels and random weights")
    p.add_argument("--defenses", default=DEFAULT_DEFENSES, help=f"comma-separated from {DEFENSE_CHOICES}")
    p.add_argument("--backends", default="eager", help="comma-separated from eager, compiled, triton, onnx")
    add_dtype_arg(p, default="fp32", several=True)
    p.add_argument("--batch-size", type=batch_sizes, default=[1], metavar="B[,B...]",
                   help="images per timed call; several (e.g. 1,8) give one set of rows each")
    p.add_argument("--images", type=positive_int, default=8, help="images timed, a multiple of every --batch-size")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed calls on the first batch")
    p.add_argument("--repeats", type=positive_int, default=1, help="passes over the images")
    p.add_argument("--dataset", default=None, help="real images: digits | fashion | imagefolder:PATH | dtd:ROOT ... "
                   "(default: a bundled model's held-out images, random pixels otherwise)")
    add_labels_args(p, "DTD's 47, or the bundled model's")
    add_templates_arg(p, "'A surface with a {} texture.', or the dataset's")
    p.add_argument("--explain", action="store_true", help="print the encoder passes per image of each defense, "
                   "counted in an eager run, beside spec section 5, and exit (status 1 on a mismatch)")
    p.add_argument("--from-benchmark-json", default=None, metavar="FILE",
                   help="print the table of a pytest-benchmark JSON written by benchmarks/ and exit "
                        "(default: measure)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..backends import parse_backends
    from ..bench.explain import count_row, format_explain
    from ..bench.latency import PAPER, benchmark, format_table, prepare, reports_from_benchmark_json
    from ..bench.official import LABEL as OFFICIAL
    from ..defenses import parse_defenses
    from ..precision import dtype_name, parse_dtypes
    from ..provenance import busy_warning, hardware, load_average, versions

    if args.from_benchmark_json:
        for report in reports_from_benchmark_json(args.from_benchmark_json):
            print(format_table(report))
        return 0
    # every argument and the output path are checked before any work
    check_output(args.json)
    check_device_arg(args.device)
    labels = parse_defenses(args.defenses)
    backends = parse_backends(args.backends)
    dtypes = parse_dtypes(args.dtype)
    bad = [b for b in args.batch_size if args.images % b]
    if not args.explain and bad:
        raise SccError(f"--images ({args.images}) must be a positive multiple of every --batch-size ({bad[0]} is "
                       f"not a divisor); e.g. --images {math.lcm(*args.batch_size)}")
    if "onnx" in backends:
        from ..errors import require_extra

        require_extra("onnx", what="--backends onnx")
    classes = parse_labels(args.labels, args.labels_file)
    templates = parse_templates(args.templates)
    apply_threads(args.threads)
    load_at_start = load_average()  # before this run's own model loading adds to it
    status(args, f"bench: loading {args.model}")
    clf, x, _, pixels = prepare(args.model, args.pretrained, args.images, args.device, args.seed, args.dataset,
                                classes, templates)
    report = {"hardware": hardware(args.device), "versions": versions(), "model": args.model,
              "pretrained": args.pretrained, "batch_size": args.batch_size[0], "batch_sizes": args.batch_size,
              "n_images": args.images,
              "pixels": pixels, "n_classes": clf.num_classes, "seed": args.seed, "load_average_at_start": load_at_start}
    if args.explain:  # counts passes, times nothing: the machine's load does not matter here
        rows = [count_row(clf, label, x, args.seed) for label in labels]
        if args.json != "-":
            print(format_explain(rows, args.model))
        write_json({**report, "explain": rows}, args.json)
        return 0 if all(r["match"] is not False for r in rows) else 1
    busy = busy_warning()
    if busy:  # a warning, printed even with --quiet
        print(busy, file=sys.stderr, flush=True)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    planned = [(label, backend, dtype_name(dtype), size) for size in args.batch_size for label in labels
               for backend in backends for dtype in dtypes]
    planned += [(OFFICIAL, "eager", "fp32", size) for size in args.batch_size if "ttc" in labels]
    measured = {"rows": [], "limits": {}}

    def snapshot():
        rows = measured["rows"]
        done = {(r["spec"], r["backend"], r["dtype"], r["batch_size"]) for r in rows}
        missing = [f"{label} {backend} {dtype} batch {size}" for label, backend, dtype, size in planned
                   if (label, backend, dtype, size) not in done]
        return {**report, "limits": measured["limits"], "rows": rows}, len(rows), len(planned), missing

    def progress(rows: list[dict], limits: dict) -> None:  # a run cut short keeps the rows it measured
        measured.update(rows=list(rows), limits=limits)
        if args.json != "-":
            write_json(partial_report("rows", *snapshot()), args.json)

    with interruptible("rows", lambda partial: write_json_to(partial, args.json), total=len(planned)) as keep:
        keep(snapshot)
        rows, skipped, limits = benchmark(clf, x, labels, backends, dtypes, args.batch_size, args.warmup,
                                          args.repeats, args.seed, log, progress=progress)
    report.update(limits=limits, rows=rows, skipped=skipped,
                  paper_table4={k: {"s_per_image": s, "robust_acc": a} for k, (s, a) in PAPER.items()})
    if args.json != "-":
        print(format_table(report))  # before the file: a failing write never costs the results
    write_json(report, args.json)
    return 0

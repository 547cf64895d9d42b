"""`scc bench`: per-image latency of defenses x backends on one model, SCC Table 4 style.

    python -m scc.bench --model ViT-B-32 --pretrained none --defenses none,ttc,scc-latency,scc,rtpt \\
        --backends eager --batch-size 1 --images 8 --device cpu --json out.json
    python -m scc.bench --explain                       # encoder passes per image, counted, vs spec section 5
    python -m scc.bench --from-benchmark-json FILE      # the same table from `pytest benchmarks/ --benchmark-json`

Defense names: `none`, `ttc`, `scc`, `rtpt`, and `name-preset` (e.g. `scc-latency`). Labels: the bundled
`scc-tiny-digits` uses its ten digits and its template on real held-out digits; any other model uses DTD's 47
classes with "A surface with a {} texture." on uniform random pixels (or `--dataset SPEC` for real images,
with that dataset's classes and template).

Timing: the images are split into batches of --batch-size and each defense draws its randomness for every
batch before timing, so every backend replays identical draws (`top1_agreement` compares its top-1 with the
eager backend's on them). --warmup calls on the first batch are excluded; CUDA is synchronised inside the timed
region; seconds per image = call seconds / batch size; median and p20/p80 over the timed calls. A backend's
compile/capture/export time is measured by `make_runner` and reported apart (`compile_seconds`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .backends import BACKENDS, BackendUnavailable, make_runner, parse_backends
from .cost import count_row, format_explain
from .data import DTD_CLASSES, TEMPLATES, load_dataset
from .defenses import defend, parse_defense, split_defense_name
from .env import busy_warning, hardware, versions
from .models import SccError, TINY_NAME, ZeroShotClassifier, check_device, image_size_of, load
from .timing import summarize, timed_call, warm_up

DEFAULT_DEFENSES = "none,ttc,scc-latency,scc,rtpt"

# SCC project page, Table 4 (DTD; hardware not stated): seconds per image and robust accuracy (PGD-10, 1/255)
PAPER = {"rtpt": (0.37, 32.8), "ttc": (0.012, 27.4), "scc": (0.0125, 34.6)}

def parse_defenses(text: str) -> list[str]:
    specs = [d.strip().lower() for d in text.split(",") if d.strip()]
    if not specs:
        raise SccError(f"no defense in {text!r}; e.g. --defenses {DEFAULT_DEFENSES}")
    for spec in specs:
        parse_defense(spec)  # unknown name or preset: SccError listing every valid name
    return specs


# ----------------------------------------------------------------------------------------------------------
# Model and images
# ----------------------------------------------------------------------------------------------------------
def prepare(model: str = TINY_NAME, pretrained: str | None = None, n_images: int = 8, device: str = "cpu",
            seed: int = 0, dataset: str | None = None, labels: Sequence[str] | None = None,
            templates: Sequence[str] | None = None) -> tuple[ZeroShotClassifier, torch.Tensor, torch.Tensor | None, str]:
    """(classifier, images (n, 3, S, S), targets or None, description of the pixels) for a benchmark."""
    check_device(device)
    if dataset is None and model == TINY_NAME:
        dataset = "digits"
    if dataset is not None:
        data = load_dataset(dataset, image_size_of(model), n_images)
        if len(data.targets) < n_images:
            raise SccError(f"dataset {dataset} has only {len(data.targets)} images, fewer than --images {n_images}")
        if model == TINY_NAME and dataset == "digits":
            clf = load(model, pretrained, labels=labels, templates=templates, device=device, seed=seed)
            what = "held-out digits (sklearn load_digits test split)"
        else:
            clf = load(model, pretrained, labels=labels or data.classes, templates=templates or data.templates,
                       device=device, seed=seed)
            what = f"images of {data.name}"
        return clf, data.images.to(device), data.targets.to(device), what
    clf = load(model, pretrained, labels=labels or list(DTD_CLASSES), templates=templates or TEMPLATES["dtd"],
               device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_images, 3, clf.image_size, clf.image_size, generator=gen)
    return clf, x.to(device), None, f"uniform random pixels (seed {seed}), DTD labels"


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
def batches_of(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1 or len(x) < batch_size or len(x) % batch_size:
        raise SccError(f"--images ({len(x)}) must be a positive multiple of --batch-size ({batch_size})")
    return [x[i: i + batch_size] for i in range(0, len(x), batch_size)]


def time_batches(run: Callable, batches: list[torch.Tensor], draws: list[dict], warmup: int = 1,
                 repeats: int = 1) -> tuple[list[float], list[torch.Tensor], float]:
    """(seconds per call, logits of the first pass over the batches, warm-up seconds), via scc.timing."""
    device = batches[0].device
    warmup_seconds = warm_up(lambda: run(batches[0], draws[0]), device, warmup)
    seconds, outputs = [], []
    with torch.no_grad():
        for rep in range(repeats):
            for x, d in zip(batches, draws):
                t, out = timed_call(lambda: run(x, d), device)
                seconds.append(t)
                if rep == 0:
                    outputs.append(out.detach().float().cpu())
    return seconds, outputs, warmup_seconds


def agreement(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    same = sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(outputs, reference))
    return same / sum(len(r) for r in reference)


def measure(clf: ZeroShotClassifier, specs: Sequence[str], backends: Sequence[str], x: torch.Tensor,
            batch_size: int = 1, warmup: int = 1, repeats: int = 1, seed: int = 0,
            log: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): one row per defense x backend; skipped lists what a backend cannot run, with the reason.

    `top1_agreement` compares a backend's top-1 with the eager backend's on the same images and draws; the
    eager row is the reference itself (None)."""
    batches = batches_of(x, batch_size)
    rows, skipped = [], []
    for spec in specs:
        name, preset = split_defense_name(spec)
        defended = defend(clf, name, preset=preset, seed=seed)
        draws = [defended.draws(b) for b in batches]
        reference = None
        for backend in (["eager"] if "eager" in backends else []) + [b for b in backends if b != "eager"]:
            if any(s["backend"] == backend and s["defense"] == "*" for s in skipped):
                continue  # its module is missing: said once
            try:
                runner = make_runner(defended, backend, batch_size)
            except BackendUnavailable as err:
                missing = isinstance(err.__cause__, ImportError)
                skipped.append({"defense": "*" if missing else spec, "backend": backend, "reason": str(err)})
                if log:
                    log(f"skipping {'every defense' if missing else spec} on {backend}: {err}")
                continue
            seconds, outputs, warmup_seconds = time_batches(runner, batches, draws, warmup, repeats)
            if backend == "eager":
                reference = outputs
            elif reference is None:  # the eager reference on the same draws, untimed
                with torch.no_grad():
                    reference = [defended(b, d).float().cpu() for b, d in zip(batches, draws)]
            stats = summarize(seconds, per=batch_size)
            rows.append({"defense": name, "preset": preset, "spec": spec, "backend": backend,
                         "seconds_per_image": stats["median"], "p20": stats["p20"], "p80": stats["p80"],
                         "compile_seconds": runner.compile_seconds, "warmup_seconds": warmup_seconds,
                         "timed_calls": stats["calls"],
                         "top1_agreement": None if backend == "eager" else agreement(outputs, reference)})
            if log:
                log(f"{spec:<14}{backend:<10}{rows[-1]['seconds_per_image']:.4f} s/image")
    return rows, skipped


# ----------------------------------------------------------------------------------------------------------
# The Table 4 style table
# ----------------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def format_table(report: dict) -> str:
    """Rows = defense x backend: our s/image, p20-p80, compile s, top-1 agreement, x TTC, R-TPT / row, and
    SCC Table 4's figures (R-TPT 0.37 s, TTC 0.012 s, SCC 0.0125 s; robust acc 32.8/27.4/34.6) beside them."""
    hw = report.get("hardware", {})
    where = hw.get("gpu") or f"{hw.get('cpu', '?')} ({hw.get('cpu_cores', '?')} cores, {hw.get('torch_threads', '?')} threads)"
    lines = [f"{report.get('model')} on {where}, batch {report.get('batch_size')}, {report.get('n_images')} images"
             + (f" ({report['pixels']})" if report.get("pixels") else "")]
    head = (f"{'defense':<14}{'backend':<10}{'s/image':>9}{'p20-p80':>17}{'compile s':>11}{'top1=':>7}"
            f"{'x TTC':>8}{'R-TPT/x':>9}  | {'paper s':>8}{'x TTC':>7}{'R-TPT/x':>9}{'robust':>8}")
    lines += [head, "-" * len(head)]
    rows = report["rows"]
    ref = {(r["defense"], r["backend"]): r["seconds_per_image"] for r in rows if r["preset"] == "paper"}
    p_ttc, p_rtpt = PAPER["ttc"][0], PAPER["rtpt"][0]
    for r in rows:
        spec = r.get("spec") or (r["defense"] if r["preset"] == "paper" else f"{r['defense']}-{r['preset']}")
        t = r["seconds_per_image"]
        p20_80 = f"{r['p20']:.4f}-{r['p80']:.4f}" if r.get("p20") is not None else "-"
        comp = f"{r['compile_seconds']:.1f}" if r.get("compile_seconds") is not None else "-"
        agree = f"{r['top1_agreement']:.2f}" if r.get("top1_agreement") is not None else "-"
        ttc, rtpt = ref.get(("ttc", r["backend"])), ref.get(("rtpt", r["backend"]))
        line = (f"{spec:<14}{r['backend']:<10}{t:>9.4f}{p20_80:>17}{comp:>11}{agree:>7}"
                f"{_ratio(t, ttc):>8}{_ratio(rtpt, t):>9}  |")
        if r["defense"] in PAPER:
            ps, acc = PAPER[r["defense"]]
            line += f"{ps:>8g}{ps / p_ttc:>7.2f}{p_rtpt / ps:>9.1f}{acc:>8.1f}"
        lines.append(line)
    summary = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        get = lambda spec: next((r["seconds_per_image"] for r in rows
                                 if r["backend"] == backend and (r.get("spec") or r["defense"]) == spec), None)
        parts = [f"R-TPT/SCC {_ratio(get('rtpt'), get('scc'))} (paper {p_rtpt / PAPER['scc'][0]:.1f})",
                 f"SCC/TTC {_ratio(get('scc'), get('ttc'))} (paper {PAPER['scc'][0] / p_ttc:.2f})",
                 f"SCC-latency/TTC {_ratio(get('scc-latency'), get('ttc'))}",
                 f"R-TPT/TTC {_ratio(get('rtpt'), get('ttc'))} (paper {p_rtpt / p_ttc:.1f})"]
        summary.append(f"  {backend}: " + ", ".join(parts))
    lines += ["", "ratios of s/image:"] + summary + [
              "paper = SCC project page Table 4 (DTD, hardware not stated); robust = its PGD-10 1/255 robust accuracy"]
    for s in report.get("skipped", []):
        lines.append(f"skipped {'every defense' if s['defense'] == '*' else s['defense']} on {s['backend']}: "
                     f"{s['reason']}")
    return "\n".join(lines)


def reports_from_benchmark_json(path: str | Path) -> list[dict]:
    """pytest-benchmark JSON (benchmarks/) -> one report per model, in the schema `format_table` reads."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SccError(f"cannot read pytest-benchmark JSON {path}: {err}") from err
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not benches:
        raise SccError(f"{path} has no 'benchmarks' list: write it with `pytest benchmarks/ --benchmark-json {path}`")
    reports: dict[str, dict] = {}
    for b in benches:
        info = b.get("extra_info", {})
        if "defense" not in info or "backend" not in info:
            continue  # not one of ours
        batch = info.get("batch_size", 1)
        report = reports.setdefault(info.get("model", b.get("group")), {
            "hardware": info.get("hardware", {}), "versions": info.get("versions", {}), "model": info.get("model"),
            "batch_size": batch, "n_images": info.get("n_images"), "pixels": info.get("pixels"), "rows": []})
        stats = b.get("stats", {})
        report["rows"].append({
            "defense": info["defense"], "preset": info.get("preset", "paper"), "spec": info.get("spec"),
            "backend": info["backend"], "seconds_per_image": stats["median"] / batch,
            "p20": info.get("p20"), "p80": info.get("p80"), "compile_seconds": info.get("compile_seconds"),
            "top1_agreement": info.get("top1_agreement"), "clean_acc": info.get("clean_acc"),
            "robust_acc": info.get("robust_acc")})
    if not reports:
        raise SccError(f"{path} holds no scc benchmark (extra_info without defense/backend)")
    return list(reports.values())


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser, _labels_args, add_common, nonnegative_int, positive_int

    p = Parser(prog="scc bench", description=__doc__)
    p.add_argument("--model", default=TINY_NAME, help="open_clip model name or the bundled model")
    p.add_argument("--pretrained", default=None, help="pretrained tag, checkpoint path, or none (random weights "
                   "drawn with --seed) (default: bundled weights for the bundled model, random otherwise)")
    p.add_argument("--defenses", default=DEFAULT_DEFENSES,
                   help="comma-separated from none, ttc, scc, scc-latency, rtpt")
    p.add_argument("--backends", default="eager", help=f"comma-separated from {', '.join(BACKENDS)}")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per timed call")
    p.add_argument("--images", type=positive_int, default=8, help="images timed, a multiple of --batch-size")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed calls on the first batch")
    p.add_argument("--repeats", type=positive_int, default=1, help="passes over the images")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws, the random pixels and random weights")
    p.add_argument("--dataset", default=None, help="real images: digits | imagefolder:PATH | dtd:ROOT ... "
                   "(default: held-out digits for the bundled model, random pixels otherwise)")
    _labels_args(p, "DTD's 47, or the digits")
    p.add_argument("--templates", default=None, help="'|'-separated templates, each with one {} "
                   "(default: 'A surface with a {} texture.', or the dataset's)")
    p.add_argument("--explain", action="store_true", help="print the encoder passes per image of each defense, "
                   "counted in an eager run, beside spec section 5, and exit (status 1 on a mismatch)")
    p.add_argument("--from-benchmark-json", default=None, metavar="FILE",
                   help="print the table of a pytest-benchmark JSON written by benchmarks/ and exit "
                        "(default: measure)")
    add_common(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import apply_threads, check_device_arg, check_output, parse_labels, parse_templates, write_json

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.from_benchmark_json:
        for report in reports_from_benchmark_json(args.from_benchmark_json):
            print(format_table(report))
        return 0
    # every argument and the output path are checked before any work
    check_output(args.json)
    check_device_arg(args.device)
    specs = parse_defenses(args.defenses)
    backends = parse_backends(args.backends)
    if not args.explain and args.images % args.batch_size:
        raise SccError(f"--images ({args.images}) must be a positive multiple of --batch-size ({args.batch_size})")
    labels = parse_labels(args.labels, args.labels_file)
    templates = parse_templates(args.templates)
    apply_threads(args.threads)
    clf, x, _, pixels = prepare(args.model, args.pretrained, args.images, args.device, args.seed, args.dataset,
                                labels, templates)
    report = {"hardware": hardware(args.device), "versions": versions(), "model": args.model,
              "pretrained": args.pretrained, "batch_size": args.batch_size, "n_images": args.images,
              "pixels": pixels, "n_classes": clf.num_classes, "seed": args.seed}
    if args.explain:  # counts passes, times nothing: the machine's load does not matter here
        rows = [count_row(clf, spec, x, args.seed) for spec in specs]
        if args.json != "-":
            print(format_explain(rows, args.model))
        write_json({**report, "explain": rows}, args.json)
        return 0 if all(r["match"] is not False for r in rows) else 1
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    busy = busy_warning()
    if busy:  # a warning, printed even with --quiet
        print(busy, file=sys.stderr, flush=True)
    rows, skipped = measure(clf, specs, backends, x, args.batch_size, args.warmup, args.repeats, args.seed, log)
    if not rows:
        raise SccError("no backend could run: " + "; ".join(s["reason"] for s in skipped))
    report.update(rows=rows, skipped=skipped,
                  paper_table4={k: {"seconds_per_image": s, "robust_acc": a} for k, (s, a) in PAPER.items()})
    if args.json != "-":
        print(format_table(report))  # before the file: a failing write never costs the results
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SccError as err:
        print(f"scc: error: {err}", file=sys.stderr)
        sys.exit(2)

"""`scc bench`: per-image latency of defenses x backends x dtypes on one model, SCC Table 4 style.

    scc bench --model ViT-B-32 --pretrained none --defenses none,ttc,scc-latency,scc,rtpt \\
        --backends eager --batch-size 1 --images 8 --device cpu --json out.json
    scc bench --explain                       # encoder passes per image, counted, vs spec section 5 (scc.bench.explain)
    scc bench --from-benchmark-json FILE      # the same table from `pytest benchmarks/ --benchmark-json`

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

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..backends import BackendUnavailable, Runner, make_runner
from ..backends.compiled import drop_compiled_graphs
from ..data import DTD_CLASSES, TEMPLATES, classifier_for, load_dataset
from ..defenses import defend, label_of, split_label
from ..errors import SccError
from ..models import TINY_NAME, ZeroShotClassifier, bundled_dataset, is_bundled, load, preprocessing_of
from ..passes import count_passes
from ..precision import check_dtype_on_device, dtype_name
from ..timing import summarize, timed_call, warm_up
from ..validation import check_device
from .official import LABEL as OFFICIAL, official_ttc
from .roofline import flops_per_image, matmul_peak, memory_bandwidth, roofline, weight_bytes

DEFAULT_DEFENSES = "none,ttc,scc-latency,scc,rtpt"

# SCC project page, Table 4 (DTD; hardware not stated): seconds per image and robust accuracy (PGD-10, 1/255)
PAPER = {"rtpt": (0.37, 32.8), "ttc": (0.012, 27.4), "scc": (0.0125, 34.6)}

# ----------------------------------------------------------------------------------------------------------
# Model and images
# ----------------------------------------------------------------------------------------------------------
def prepare(model: str = TINY_NAME, pretrained: str | None = None, n_images: int = 8, device: str = "cpu",
            seed: int = 0, dataset: str | None = None, labels: Sequence[str] | None = None,
            templates: Sequence[str] | None = None) -> tuple[ZeroShotClassifier, torch.Tensor, torch.Tensor | None, str]:
    """(classifier, images (n, 3, S, S), targets or None, description of the pixels) for a benchmark."""
    check_device(device)
    if dataset is None and is_bundled(model):
        dataset = bundled_dataset(model)
    if dataset is not None:
        data = load_dataset(dataset, preprocessing_of(model), n_images)
        if len(data.targets) < n_images:
            raise SccError(f"dataset {dataset} has only {len(data.targets)} images, fewer than --images {n_images}")
        if labels is not None:
            clf = load(model, pretrained, labels=labels, templates=templates, device=device, seed=seed)
        else:
            clf = classifier_for(data, model, pretrained, templates, device, seed)
        what = {"digits": "held-out digits (sklearn load_digits test split)",
                "fashion": "held-out Fashion-MNIST test images (the shipped 1000)"}.get(dataset, f"images of {data.name}")
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


def agreement(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    same = sum((o.argmax(-1) == r.argmax(-1)).sum().item() for o, r in zip(outputs, reference))
    return same / sum(len(r) for r in reference)


def machine_limits(dtypes: Sequence[torch.dtype], device: str | torch.device, seconds: float = 1.0) -> dict:
    """{"matmul_peak_gflops": {dtype name: GFLOP/s}, "memory_gbps": GB/s or None}, measured here and now with the
    threads the benchmark uses (a few seconds; see scc.bench.roofline)."""
    peaks = {}
    for dtype in dict.fromkeys([torch.float32, *dtypes]):  # fp32 always: reduced-precision rows keep some fp32
        check_dtype_on_device(dtype, device)
        peaks[dtype_name(dtype)] = matmul_peak(dtype, device, seconds)
    bandwidth = memory_bandwidth(device) if torch.device(device).type == "cuda" else None
    return {"matmul_peak_gflops": peaks, "memory_gbps": bandwidth}


def official_runner(defended, batch_size: int) -> Runner:
    """The official TTC procedure (scc.bench.official, eager fp32) with `defended`'s TTC settings, as a runner that
    replays TTC's draws: the reference row the engine's TTC rows are timed against."""
    cfg, clf = defended.config, defended.classifier
    settings = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, tau_thres=cfg.tau_thres, beta=cfg.beta)
    return Runner(backend="eager", defense=OFFICIAL, batch_size=batch_size, dtype=torch.float32,
                  device=clf.text.device,
                  run=lambda x, draws=None: official_ttc(clf, x, (draws or defended.draws(x))["start"], **settings))


def measure(clf: ZeroShotClassifier, labels: Sequence[str], backends: Sequence[str], x: torch.Tensor,
            batch_size: int | Sequence[int] = 1, warmup: int = 1, repeats: int = 1, seed: int = 0,
            log: Callable[[str], None] | None = None, dtypes: Sequence[torch.dtype] = (torch.float32,),
            limits: dict | None = None, official: bool = True,
            progress: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): one row per defense x batch size x backend x dtype; skipped lists what a backend cannot
    run, with the reason.

    Per defense and batch size, every (backend, dtype) runner is built and warmed up first; then the timed calls
    interleave them batch by batch (round-robin), so load that comes and goes on a shared machine hits every row
    alike and the ratios between rows are measured in one run. With `official` and TTC among the defenses, the
    official TTC procedure (scc.bench.official, eager fp32, label "ttc-official") runs interleaved with the TTC
    rows on the same draws, and every row of that batch size gets `speedup_vs_official`. `top1_agreement`
    compares a row's top-1 with the eager fp32 backend's on the same images and draws (the eager fp32 row is the
    reference itself: None). Roofline columns (scc.bench.roofline): FLOPs per image counted in an eager run of the
    defense at the row's dtype, split by the dtype that runs them, the achieved GFLOP/s and its fraction of the
    row's peak (`limits`' measured matmul peaks mixed by that split: a bf16 row's fp32 work counts at the fp32
    peak); on CUDA at
    batch 1 also the weight-streaming bound (sequential encoder rounds x weight bytes / measured bandwidth).
    `progress`, if given, is called with every row measured so far after each defense of each batch size (a long
    run cut short still leaves what it measured; the ratio columns are filled in at the end)."""
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    rows, skipped = [], []
    for size in sizes:
        _measure_batch(clf, labels, backends, x, size, warmup, repeats, seed, log, dtypes, limits or {}, official,
                       skipped, rows, progress)
    for r in rows:  # speed-ups measured in the same run: over fp32 (same backend), over the official TTC procedure
        same = [o for o in rows if o["batch_size"] == r["batch_size"]]
        base = next((o["seconds_per_image"] for o in same if o["label"] == r["label"] and o["backend"] == r["backend"]
                     and o["dtype"] == "fp32"), None)
        r["speedup_vs_fp32"] = base / r["seconds_per_image"] if base else None
        official_s = next((o["seconds_per_image"] for o in same if o["label"] == OFFICIAL), None)
        r["speedup_vs_official"] = official_s / r["seconds_per_image"] if official_s else None
    return rows, skipped


def _measure_batch(clf, labels, backends, x, batch_size, warmup, repeats, seed, log, dtypes, limits, official,
                   skipped, rows, progress=None) -> None:
    """Appends this batch size's rows to `rows` (every row so far goes to `progress` after each defense)."""
    batches = batches_of(x, batch_size)
    device = batches[0].device
    order = (["eager"] if "eager" in backends else []) + [b for b in backends if b != "eager"]
    for label in labels:
        name, preset = split_label(label)
        defended = defend(clf, name, preset=preset, seed=seed)
        draws = [defended.draws(b) for b in batches]
        with count_passes(clf, batch_size) as counter:  # one eager call counts FLOPs and encoder rounds
            flops = {torch.float32: flops_per_image(defended, batches[0], draws[0])}
        rounds = counter.image_rounds
        passes = {k: v for k, v in counter.summary().items() if k != "image_rounds"}  # per image, counted
        runners = []
        if official and label == "ttc":
            runners.append((official_runner(defended, batch_size), None, [], []))
        for backend in order:
            for dtype in dtypes:
                if any(s["backend"] == backend and s["defense"] == "*" for s in skipped):
                    continue  # its module is missing: said once
                try:
                    runner = make_runner(defended, backend, batch_size, dtype=dtype)
                except BackendUnavailable as err:
                    missing = isinstance(err.__cause__, ImportError)
                    if not any(s["defense"] == ("*" if missing else label) and s["backend"] == backend
                               and s["dtype"] == dtype_name(dtype) for s in skipped):
                        skipped.append({"defense": "*" if missing else label, "backend": backend,
                                        "dtype": dtype_name(dtype), "reason": str(err)})
                        if log:
                            log(f"skipping {'every defense' if missing else label} on {backend} "
                                f"{dtype_name(dtype)}: {err}")
                    continue
                runners.append((runner, None, [], []))
        for i, (runner, _, seconds, outputs) in enumerate(list(runners)):
            try:
                runners[i] = (runner, warm_up(lambda: runner(batches[0], draws[0]), device, warmup), seconds, outputs)
            except SccError as err:  # this row cannot run: say so, keep measuring the others
                skipped.append({"defense": runner.defense, "backend": runner.backend,
                                "dtype": dtype_name(runner.dtype), "batch_size": batch_size, "reason": str(err)})
                if log:
                    log(f"skipping {runner.defense} on {runner.backend} {dtype_name(runner.dtype)}: {err}")
                runners[i] = None
        runners = [r for r in runners if r is not None]
        for dtype in dict.fromkeys(r[0].dtype for r in runners):  # who runs which FLOPs in a reduced-precision
            if dtype not in flops:                                  # row: one eager call at that dtype
                flops[dtype] = flops_per_image(defended, batches[0], draws[0], dtype)
        with torch.no_grad():
            for rep in range(repeats):
                for b, d in zip(batches, draws):
                    for runner, _, seconds, outputs in runners:
                        t, out = timed_call(lambda: runner(b, d), device)
                        seconds.append(t)
                        if rep == 0:
                            outputs.append(out.detach().float().cpu())
            is_reference = lambda r: r.backend == "eager" and r.dtype == torch.float32 and r.defense == label
            reference = next((o for r, _, _, o in runners if is_reference(r)), None)
            if reference is None:  # the eager fp32 reference on the same draws, untimed
                reference = [defended(b, d).float().cpu() for b, d in zip(batches, draws)]
        for runner, warmup_seconds, seconds, outputs in runners:
            stats = summarize(seconds, per=batch_size)
            dt = dtype_name(runner.dtype)
            row_preset = "official" if runner.defense == OFFICIAL else preset
            row = {"defense": name, "preset": row_preset, "label": runner.defense, "backend": runner.backend,
                   "dtype": dt, "batch_size": batch_size,
                   "seconds_per_image": stats["median"], "p20": stats["p20"], "p80": stats["p80"],
                   "compile_seconds": runner.compile_seconds, "warmup_seconds": warmup_seconds,
                   "timed_calls": stats["calls"],
                   "top1_agreement": None if is_reference(runner) else agreement(outputs, reference),
                   **roofline(flops[runner.dtype], stats["median"], limits.get("matmul_peak_gflops", {})),
                   "encoder_rounds": rounds, "encoder_passes": passes}
            if limits.get("memory_gbps") and batch_size == 1:
                bound = rounds * weight_bytes(clf, runner.dtype) / (limits["memory_gbps"] * 1e9)
                row.update(weight_streaming_bound_s=bound, weight_streaming_fraction=bound / stats["median"])
            rows.append(row)
            if log:
                log(f"{runner.defense:<20}{runner.backend:<10}{dt:<6}batch {batch_size:<4}"
                    f"{row['seconds_per_image']:.4f} s/image")
        if progress:
            progress(rows)
        release(runners)


def release(runners: list) -> None:
    """Free a defense's runners before the next one is built, and after compiled ones the graphs torch keeps for
    the process (scc.backends.compiled.drop_compiled_graphs): otherwise a bench of several defenses on compiled
    backends keeps every earlier defense's graphs, with their frozen weights, resident until the process ends."""
    compiled = any(r[0].backend != "eager" for r in runners)
    runners.clear()
    if compiled:
        drop_compiled_graphs()


# ----------------------------------------------------------------------------------------------------------
# The Table 4 style table
# ----------------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def format_table(report: dict) -> str:
    """Rows = defense x batch size x backend x dtype: our s/image, p20-p80, compile s, top-1 agreement, x fp32,
    the roofline columns, x TTC, x the official TTC procedure, R-TPT / row, and SCC Table 4's figures (R-TPT 0.37 s,
    TTC 0.012 s, SCC 0.0125 s; robust acc 32.8/27.4/34.6) beside them."""
    hw = report.get("hardware", {})
    where = hw.get("gpu") or f"{hw.get('cpu', '?')} ({hw.get('cpu_cores', '?')} cores, {hw.get('torch_threads', '?')} threads)"
    sizes = report.get("batch_sizes") or [report.get("batch_size")]
    at_start = report.get("load_average_at_start", hw.get("load_average"))  # before the model loaded, if recorded
    load = f", load average {at_start:.2f} at start" if at_start is not None else ""
    lines = [f"{report.get('model')} on {where}{load}, batch {','.join(str(b) for b in sizes)}, "
             f"{report.get('n_images')} images" + (f" ({report['pixels']})" if report.get("pixels") else "")]
    head = (f"{'defense':<20}{'batch':>5} {'backend':<10}{'dtype':<6}{'s/image':>9}{'p20-p80':>17}{'compile s':>11}"
            f"{'top1=':>7}{'x fp32':>7}{'GFLOP':>8}{'GFLOP/s':>9}{'%peak':>7}{'x TTC':>7}{'x off.':>7}{'R-TPT/x':>9}"
            f"  | {'paper s':>8}{'x TTC':>7}{'R-TPT/x':>9}{'robust':>8}")
    lines += [head, "-" * len(head)]
    rows = report["rows"]
    batch_of = lambda r: r.get("batch_size", report.get("batch_size"))
    ref = {(r["defense"], batch_of(r), r["backend"], r.get("dtype", "fp32")): r["seconds_per_image"] for r in rows
           if r["preset"] == "paper"}
    p_ttc, p_rtpt = PAPER["ttc"][0], PAPER["rtpt"][0]
    for r in rows:
        label = r.get("label") or label_of(r["defense"], r["preset"])
        t = r["seconds_per_image"]
        p20_80 = f"{r['p20']:.4f}-{r['p80']:.4f}" if r.get("p20") is not None else "-"
        comp = f"{r['compile_seconds']:.1f}" if r.get("compile_seconds") is not None else "-"
        agree = f"{r['top1_agreement']:.2f}" if r.get("top1_agreement") is not None else "-"
        dt = r.get("dtype", "fp32")
        key = (batch_of(r), r["backend"], dt)
        ttc, rtpt = ref.get(("ttc", *key)), ref.get(("rtpt", *key))
        fmt = lambda key, f: format(r[key], f) if r.get(key) is not None else "-"
        pct = f"{100 * r['peak_fraction']:.1f}" if r.get("peak_fraction") is not None else "-"
        line = (f"{label:<20}{batch_of(r)!s:>5} {r['backend']:<10}{dt:<6}{t:>9.4f}{p20_80:>17}{comp:>11}{agree:>7}"
                f"{fmt('speedup_vs_fp32', '.2f'):>7}{fmt('gflop_per_image', '.2f'):>8}{fmt('gflop_per_s', '.1f'):>9}"
                f"{pct:>7}{_ratio(t, ttc):>7}{fmt('speedup_vs_official', '.2f'):>7}{_ratio(rtpt, t):>9}  |")
        if r["defense"] in PAPER and r["preset"] == "paper":
            ps, acc = PAPER[r["defense"]]
            line += f"{ps:>8g}{ps / p_ttc:>7.2f}{p_rtpt / ps:>9.1f}{acc:>8.1f}"
        lines.append(line)
    summary = []
    for batch, backend, dt in dict.fromkeys((batch_of(r), r["backend"], r.get("dtype", "fp32")) for r in rows):
        get = lambda label: next((r["seconds_per_image"] for r in rows if r["backend"] == backend and batch_of(r) == batch
                                  and r.get("dtype", "fp32") == dt and (r.get("label") or r["defense"]) == label), None)
        parts = [f"R-TPT/SCC {_ratio(get('rtpt'), get('scc'))} (paper {p_rtpt / PAPER['scc'][0]:.1f})",
                 f"SCC/TTC {_ratio(get('scc'), get('ttc'))} (paper {PAPER['scc'][0] / p_ttc:.2f})",
                 f"SCC-latency/TTC {_ratio(get('scc-latency'), get('ttc'))}",
                 f"R-TPT/TTC {_ratio(get('rtpt'), get('ttc'))} (paper {p_rtpt / p_ttc:.1f})"]
        summary.append(f"  batch {batch} {backend} {dt}: " + ", ".join(parts))
    peaks = report.get("limits", {}).get("matmul_peak_gflops")
    lines += ["", "ratios of s/image:"] + summary + [
              "paper = SCC project page Table 4 (DTD, hardware not stated); robust = its PGD-10 1/255 robust accuracy",
              "top1= agreement with eager fp32 on the same draws; x fp32 = speed-up over fp32, same backend, same run",
              f"x off. = speed-up over {OFFICIAL}, the official TTC procedure (eager fp32, its order of passes; "
              "scc.bench.official), same batch size, same run"]
    if peaks:
        lines.append("%peak = achieved GFLOP/s / measured matmul peak (" + ", ".join(
            f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + f", {hw.get('torch_threads', '?')} threads; a "
            "reduced-precision row's peak mixes them by the FLOPs each dtype runs)")
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
            "defense": info["defense"], "preset": info.get("preset", "paper"), "label": info.get("label"),
            "backend": info["backend"], "seconds_per_image": stats["median"] / batch,
            "p20": info.get("p20"), "p80": info.get("p80"), "compile_seconds": info.get("compile_seconds"),
            "top1_agreement": info.get("top1_agreement"), "clean_acc": info.get("clean_acc"),
            "robust_acc": info.get("robust_acc")})
    if not reports:
        raise SccError(f"{path} holds no scc benchmark (extra_info without defense/backend)")
    return list(reports.values())


def benchmark(clf: ZeroShotClassifier, x: torch.Tensor, labels: Sequence[str], backends: Sequence[str],
              dtypes: Sequence[torch.dtype], batch_size: int | Sequence[int] = 1, warmup: int = 1, repeats: int = 1,
              seed: int = 0, log: Callable[[str], None] | None = None, official: bool = True,
              progress: Callable[[list[dict], dict], None] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(rows, skipped, limits): `measure` between two measurements of the machine's matmul peak. On a shared
    machine the better of the two is the closer to the quiet peak; every row's fraction is computed against it.
    `progress(rows so far, limits measured at the start)` as in `measure`."""
    device = x.device
    limits = machine_limits(dtypes, device)
    rows, skipped = measure(clf, labels, backends, x, batch_size, warmup, repeats, seed, log, dtypes, limits, official,
                            progress and (lambda done: progress(done, limits)))
    after = machine_limits(dtypes, device)
    limits["matmul_peak_gflops_start"] = dict(limits["matmul_peak_gflops"])
    limits["matmul_peak_gflops"] = {k: max(v, after["matmul_peak_gflops"][k])
                                    for k, v in limits["matmul_peak_gflops"].items()}
    for r in rows:
        flops = {d: g * 1e9 for d, g in r["gflop_per_image_by_dtype"].items()}
        r.update(roofline(flops, r["seconds_per_image"], limits["matmul_peak_gflops"]))
    if not rows:
        raise SccError("no backend could run: " + "; ".join(s["reason"] for s in skipped))
    return rows, skipped, limits

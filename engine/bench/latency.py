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
compile/capture/export time is measured by `make_runner` and reported apart (`compile_s`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..backends import BackendUnavailable, Runner, make_runner
from ..backends.compiled import drop_compiled_graphs
from ..data import DTD_CLASSES, TEMPLATES, classifier_for, load_dataset
from ..defenses import Defended, defend, spec_of, split_spec
from ..errors import SccError
from ..metrics import top1_agreement
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
    return Runner(backend="eager", spec=OFFICIAL, batch_size=batch_size, dtype=torch.float32,
                  device=clf.text.device,
                  run=lambda x, draws=None: official_ttc(clf, x, (draws or defended.draws(x))["start"], **settings))


@dataclass
class Settings:
    """How every defense of a bench is measured: the backends and dtypes of its rows, untimed warm-up calls on the
    first batch, passes over the images, the seed of the draws, the machine's measured limits (roofline columns),
    whether the official TTC procedure rides with the TTC rows, and where skips and rows are logged."""
    backends: Sequence[str]
    dtypes: Sequence[torch.dtype] = (torch.float32,)
    warmup: int = 1
    repeats: int = 1
    seed: int = 0
    limits: dict = field(default_factory=dict)
    official: bool = True
    log: Callable[[str], None] | None = None


@dataclass
class Timed:
    """A warmed-up runner and its measurements: warm-up seconds, one sample per timed call, the first pass's
    outputs (fp32, on the CPU)."""
    runner: Runner
    warmup_s: float
    seconds: list[float] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class BatchBench:
    """One defense spec at one batch size: its images in batches with the draws of each, the FLOPs per image
    (split by dtype, for each dtype a runner runs) and encoder passes counted in an eager run, and its warmed-up
    runners. `time()` interleaves their timed calls; `rows()` turns the measurements into the bench's rows. What
    cannot run goes to `skipped`, the list the whole bench shares (each backend's missing module said once)."""
    spec: str
    defended: Defended
    batches: list[torch.Tensor]
    draws: list[dict]
    settings: Settings
    skipped: list[dict]
    flops: dict[torch.dtype, dict]
    rounds: int
    passes: dict
    timed: list[Timed] = field(default_factory=list)

    @classmethod
    def build(cls, clf: ZeroShotClassifier, spec: str, batches: list[torch.Tensor], settings: Settings,
              skipped: list[dict]) -> BatchBench:
        """The defense, its draws and counts, and every runner it gets that builds and warms up (the others go to
        `skipped`, once each)."""
        name, preset = split_spec(spec)
        defended = defend(clf, name, preset=preset, seed=settings.seed)
        draws = [defended.draws(b) for b in batches]
        with count_passes(clf, len(batches[0])) as counter:  # one eager call counts FLOPs and encoder rounds
            flops = {torch.float32: flops_per_image(defended, batches[0], draws[0])}
        passes = {k: v for k, v in counter.summary().items() if k != "image_rounds"}  # per image, counted
        bench = cls(spec, defended, batches, draws, settings, skipped, flops, counter.image_rounds, passes)
        warmed = [bench.warm(runner) for runner in bench.runners()]  # every runner built, then each warmed up
        bench.timed = [t for t in warmed if t is not None]
        for dtype in dict.fromkeys(t.runner.dtype for t in bench.timed):  # who runs which FLOPs in a reduced-
            if dtype not in flops:                                          # precision row: one eager call each
                flops[dtype] = flops_per_image(defended, batches[0], draws[0], dtype)
        return bench

    @property
    def batch_size(self) -> int:
        return len(self.batches[0])

    def runners(self) -> list[Runner]:
        """The official TTC procedure (with TTC, if asked), then one runner per backend (eager first) and dtype."""
        backends = self.settings.backends
        out = [official_runner(self.defended, self.batch_size)] if self.settings.official and self.spec == "ttc" else []
        for backend in (["eager"] if "eager" in backends else []) + [b for b in backends if b != "eager"]:
            for dtype in self.settings.dtypes:
                if any(s["backend"] == backend and s["spec"] == "*" for s in self.skipped):
                    continue  # its module is missing: said once
                try:
                    out.append(make_runner(self.defended, backend, self.batch_size, dtype=dtype))
                except BackendUnavailable as err:
                    who = "*" if isinstance(err.__cause__, ImportError) else self.spec  # "*": its module is missing
                    entry = {"defense": who if who == "*" else split_spec(who)[0], "spec": who, "backend": backend,
                             "dtype": dtype_name(dtype), "reason": str(err)}
                    if not any(s["spec"] == who and s["backend"] == backend and s["dtype"] == entry["dtype"]
                               for s in self.skipped):
                        self.skip(entry, "every defense" if who == "*" else who)
        return out

    def warm(self, runner: Runner) -> Timed | None:
        """The runner after its untimed warm-up calls on the first batch; None (and a skip) where it cannot run."""
        try:
            seconds = warm_up(lambda: runner(self.batches[0], self.draws[0]), self.batches[0].device,
                              self.settings.warmup)
        except SccError as err:  # this row cannot run: say so, keep measuring the others
            self.skip({"defense": split_spec(runner.spec)[0], "spec": runner.spec, "backend": runner.backend,
                       "dtype": dtype_name(runner.dtype),
                       "batch_size": self.batch_size, "reason": str(err)}, runner.spec)
            return None
        return Timed(runner, seconds)

    def skip(self, entry: dict, who: str) -> None:
        self.skipped.append(entry)
        if self.settings.log:
            self.settings.log(f"skipping {who} on {entry['backend']} {entry['dtype']}: {entry['reason']}")

    def time(self) -> None:
        """Every runner on every batch with its draws, batch by batch (round-robin), `repeats` passes."""
        device = self.batches[0].device
        with torch.no_grad():
            for rep in range(self.settings.repeats):
                for b, d in zip(self.batches, self.draws):
                    for t in self.timed:
                        seconds, out = timed_call(lambda: t.runner(b, d), device)
                        t.seconds.append(seconds)
                        if rep == 0:
                            t.outputs.append(out.detach().float().cpu())

    def is_reference(self, runner: Runner) -> bool:
        return runner.backend == "eager" and runner.dtype == torch.float32 and runner.spec == self.spec

    def reference(self) -> torch.Tensor:
        """The eager fp32 logits on every batch and its draws: the timed eager fp32 row's, else computed untimed."""
        own = next((t.outputs for t in self.timed if self.is_reference(t.runner)), None)
        if own is None:
            with torch.no_grad():
                own = [self.defended(b, d).float().cpu() for b, d in zip(self.batches, self.draws)]
        return torch.cat(own)

    def rows(self) -> list[dict]:
        """One row per timed runner (call `time()` first)."""
        reference = self.reference()
        return [self.row(t, reference) for t in self.timed]

    def row(self, t: Timed, reference: torch.Tensor) -> dict:
        runner, limits = t.runner, self.settings.limits
        stats = summarize(t.seconds, per=self.batch_size)
        name, preset = split_spec(self.spec)
        row = {"defense": name, "preset": "official" if runner.spec == OFFICIAL else preset, "spec": runner.spec,
               "backend": runner.backend, "dtype": dtype_name(runner.dtype), "batch_size": self.batch_size,
               "s_per_image": stats["median"], "p20": stats["p20"], "p80": stats["p80"],
               "compile_s": runner.compile_seconds, "warmup_s": t.warmup_s, "timed_calls": stats["calls"],
               "top1_agreement": None if self.is_reference(runner) else top1_agreement(torch.cat(t.outputs), reference),
               **roofline(self.flops[runner.dtype], stats["median"], limits.get("matmul_peak_gflops", {})),
               "encoder_rounds": self.rounds, "encoder_passes": self.passes}
        if limits.get("memory_gbps") and self.batch_size == 1:
            bound = self.rounds * weight_bytes(self.defended.classifier, runner.dtype) / (limits["memory_gbps"] * 1e9)
            row.update(weight_streaming_bound_s=bound, weight_streaming_fraction=bound / stats["median"])
        return row

    def release(self) -> None:
        runners = [t.runner for t in self.timed]
        self.timed.clear()
        release(runners)


def measure(clf: ZeroShotClassifier, specs: Sequence[str], backends: Sequence[str], x: torch.Tensor,
            batch_size: int | Sequence[int] = 1, warmup: int = 1, repeats: int = 1, seed: int = 0,
            log: Callable[[str], None] | None = None, dtypes: Sequence[torch.dtype] = (torch.float32,),
            limits: dict | None = None, official: bool = True,
            progress: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): one row per defense spec x batch size x backend x dtype; skipped lists what a backend
    cannot run, with the reason.

    Per defense and batch size, every (backend, dtype) runner is built and warmed up first; then the timed calls
    interleave them batch by batch (round-robin), so load that comes and goes on a shared machine hits every row
    alike and the ratios between rows are measured in one run. With `official` and TTC among the defenses, the
    official TTC procedure (scc.bench.official, eager fp32, spec "ttc-official") runs interleaved with the TTC
    rows on the same draws, and every row of that batch size gets `speedup_vs_official`. `top1_agreement`
    compares a row's top-1 with the eager fp32 backend's on the same images and draws (the eager fp32 row is the
    reference itself: None). Roofline columns (scc.bench.roofline): FLOPs per image counted in an eager run of the
    defense at the row's dtype, split by the dtype that runs them, the achieved GFLOP/s and its fraction of the
    row's peak (`limits`' measured matmul peaks mixed by that split: a bf16 row's fp32 work counts at the fp32
    peak); on CUDA at batch 1 also the weight-streaming bound (sequential encoder rounds x weight bytes / measured
    bandwidth). `progress`, if given, is called with every row measured so far after each defense of each batch
    size (a long run cut short still leaves what it measured; the ratio columns are filled in at the end)."""
    settings = Settings(backends, dtypes, warmup, repeats, seed, limits or {}, official, log)
    rows, skipped = [], []
    for size in [batch_size] if isinstance(batch_size, int) else batch_size:
        for defense_rows in _measure_batch(clf, specs, x, size, settings, skipped):
            rows += defense_rows
            if progress:
                progress(rows)
    for r in rows:  # speed-ups measured in the same run: over fp32 (same backend), over the official TTC procedure
        same = [o for o in rows if o["batch_size"] == r["batch_size"]]
        base = next((o["s_per_image"] for o in same if o["spec"] == r["spec"] and o["backend"] == r["backend"]
                     and o["dtype"] == "fp32"), None)
        r["speedup_vs_fp32"] = base / r["s_per_image"] if base else None
        official_s = next((o["s_per_image"] for o in same if o["spec"] == OFFICIAL), None)
        r["speedup_vs_official"] = official_s / r["s_per_image"] if official_s else None
    return rows, skipped


def _measure_batch(clf: ZeroShotClassifier, specs: Sequence[str], x: torch.Tensor, batch_size: int,
                   settings: Settings, skipped: list[dict]) -> Iterator[list[dict]]:
    """This batch size's rows, one defense after the other: each defense's rows are yielded before its runners
    are released and the next defense's are built."""
    batches = batches_of(x, batch_size)
    for spec in specs:
        bench = BatchBench.build(clf, spec, batches, settings, skipped)
        bench.time()
        rows = bench.rows()
        for r in rows if settings.log else []:
            settings.log(f"{r['spec']:<20}{r['backend']:<10}{r['dtype']:<6}batch {batch_size:<4}"
                         f"{r['s_per_image']:.4f} s/image")
        yield rows
        bench.release()


def release(runners: list[Runner]) -> None:
    """Free a defense's runners before the next one is built, and after compiled ones the graphs torch keeps for
    the process (scc.backends.compiled.drop_compiled_graphs): otherwise a bench of several defenses on compiled
    backends keeps every earlier defense's graphs, with their frozen weights, resident until the process ends."""
    compiled = any(r.backend != "eager" for r in runners)
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
    ref = {(r["defense"], batch_of(r), r["backend"], r.get("dtype", "fp32")): r["s_per_image"] for r in rows
           if r["preset"] == "paper"}
    p_ttc, p_rtpt = PAPER["ttc"][0], PAPER["rtpt"][0]
    for r in rows:
        spec = r.get("spec") or spec_of(r["defense"], r["preset"])
        t = r["s_per_image"]
        p20_80 = f"{r['p20']:.4f}-{r['p80']:.4f}" if r.get("p20") is not None else "-"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        agree = f"{r['top1_agreement']:.2f}" if r.get("top1_agreement") is not None else "-"
        dt = r.get("dtype", "fp32")
        key = (batch_of(r), r["backend"], dt)
        ttc, rtpt = ref.get(("ttc", *key)), ref.get(("rtpt", *key))
        fmt = lambda key, f: format(r[key], f) if r.get(key) is not None else "-"
        pct = f"{100 * r['peak_fraction']:.1f}" if r.get("peak_fraction") is not None else "-"
        line = (f"{spec:<20}{batch_of(r)!s:>5} {r['backend']:<10}{dt:<6}{t:>9.4f}{p20_80:>17}{comp:>11}{agree:>7}"
                f"{fmt('speedup_vs_fp32', '.2f'):>7}{fmt('gflop_per_image', '.2f'):>8}{fmt('gflop_per_s', '.1f'):>9}"
                f"{pct:>7}{_ratio(t, ttc):>7}{fmt('speedup_vs_official', '.2f'):>7}{_ratio(rtpt, t):>9}  |")
        if r["defense"] in PAPER and r["preset"] == "paper":
            ps, acc = PAPER[r["defense"]]
            line += f"{ps:>8g}{ps / p_ttc:>7.2f}{p_rtpt / ps:>9.1f}{acc:>8.1f}"
        lines.append(line)
    summary = []
    for batch, backend, dt in dict.fromkeys((batch_of(r), r["backend"], r.get("dtype", "fp32")) for r in rows):
        get = lambda spec: next((r["s_per_image"] for r in rows if r["backend"] == backend and batch_of(r) == batch
                                 and r.get("dtype", "fp32") == dt and (r.get("spec") or r["defense"]) == spec), None)
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
        lines.append(f"skipped {'every defense' if s['spec'] == '*' else s['spec']} on {s['backend']}: "
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
        either = lambda key, old: info.get(key, info.get(old))  # either spelling of the key
        report["rows"].append({
            "defense": info["defense"], "preset": info.get("preset", "paper"), "spec": either("spec", "label"),
            "backend": info["backend"], "s_per_image": stats["median"] / batch,
            "p20": info.get("p20"), "p80": info.get("p80"), "compile_s": either("compile_s", "compile_seconds"),
            "top1_agreement": info.get("top1_agreement"), "clean_acc": info.get("clean_acc"),
            "robust_acc": info.get("robust_acc")})
    if not reports:
        raise SccError(f"{path} holds no scc benchmark (extra_info without defense/backend)")
    return list(reports.values())


def benchmark(clf: ZeroShotClassifier, x: torch.Tensor, specs: Sequence[str], backends: Sequence[str],
              dtypes: Sequence[torch.dtype], batch_size: int | Sequence[int] = 1, warmup: int = 1, repeats: int = 1,
              seed: int = 0, log: Callable[[str], None] | None = None, official: bool = True,
              progress: Callable[[list[dict], dict], None] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(rows, skipped, limits): `measure` between two measurements of the machine's matmul peak. On a shared
    machine the better of the two is the closer to the quiet peak; every row's fraction is computed against it.
    `progress(rows so far, limits measured at the start)` as in `measure`."""
    device = x.device
    limits = machine_limits(dtypes, device)
    rows, skipped = measure(clf, specs, backends, x, batch_size, warmup, repeats, seed, log, dtypes, limits, official,
                            progress and (lambda done: progress(done, limits)))
    after = machine_limits(dtypes, device)
    limits["matmul_peak_gflops_start"] = dict(limits["matmul_peak_gflops"])
    limits["matmul_peak_gflops"] = {k: max(v, after["matmul_peak_gflops"][k])
                                    for k, v in limits["matmul_peak_gflops"].items()}
    for r in rows:
        flops = {d: g * 1e9 for d, g in r["gflop_per_image_by_dtype"].items()}
        r.update(roofline(flops, r["s_per_image"], limits["matmul_peak_gflops"]))
    if not rows:
        raise SccError("no backend could run: " + "; ".join(s["reason"] for s in skipped))
    return rows, skipped, limits

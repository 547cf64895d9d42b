"""pytest-benchmark suite: one benchmark per model x defense x backend, all built by `scc.backends.make_runner`
and timed through `scc.timing` (warm-up apart, the device synchronised inside every timed call).

    pytest benchmarks/                                    # every backend (one whose module is missing skips)
    pytest benchmarks/ -k eager --bench-images 8 --benchmark-json out.json
    scc bench --from-benchmark-json out.json             # the Table 4 style table of that run

Sizes (command-line option or environment variable; defaults finish in a few minutes on 2 CPU cores):
    --bench-models      SCC_BENCH_MODELS      scc-tiny-digits   comma-separated open_clip names
    --bench-pretrained  SCC_BENCH_PRETRAINED  none              tag or checkpoint for non-bundled models
    --bench-defenses    SCC_BENCH_DEFENSES    none,ttc,scc-latency,scc,rtpt
    --bench-images      SCC_BENCH_IMAGES      4                 timed images (a multiple of the batch size)
    --bench-batch-size  SCC_BENCH_BATCH_SIZE  1
    --bench-device      SCC_BENCH_DEVICE      cpu
    --bench-warmup      SCC_BENCH_WARMUP      1                 untimed calls before timing
    --bench-acc-images  SCC_BENCH_ACC_IMAGES  32                clean/robust accuracy images (bundled model only; 0: off)
    --bench-acc-eps     SCC_BENCH_ACC_EPS     1/255             PGD-10 radius of the robust accuracy
    --bench-backends    SCC_BENCH_BACKENDS    eager,compiled,triton,onnx

A (defense, backend) pair the defense's `Defense` record marks unsupported (R-TPT on compiled/triton/onnx) is not
generated at all; a backend whose module cannot be imported skips with the reason; any other failure fails.

Each benchmark round is one call on one batch (the rounds cycle through the batches); extra_info holds the
per-image p20/p80, compile and warm-up seconds (outside the timed rounds), top-1 agreement with eager on the
same draws, clean/robust accuracy where cheap, the hardware and the library versions.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from scc.backends import BackendUnavailable, make_runner, parse_backends, supports
from scc.bench.latency import batches_of, prepare
from scc.defenses import DEFENSES, defend, parse_defenses, split_spec
from scc.provenance import hardware, versions
from scc.errors import SccError
from scc.metrics import top1_agreement
from scc.timing import summarize, timed_call, warm_up

OPTIONS = {  # option -> (environment variable, default, help)
    "models": ("SCC_BENCH_MODELS", "scc-tiny-digits", "comma-separated models"),
    "pretrained": ("SCC_BENCH_PRETRAINED", "none", "pretrained tag or checkpoint (non-bundled models)"),
    "defenses": ("SCC_BENCH_DEFENSES", "none,ttc,scc-latency,scc,rtpt", "comma-separated defenses"),
    "images": ("SCC_BENCH_IMAGES", "4", "timed images"),
    "batch-size": ("SCC_BENCH_BATCH_SIZE", "1", "batch size"),
    "device": ("SCC_BENCH_DEVICE", "cpu", "cpu | cuda"),
    "warmup": ("SCC_BENCH_WARMUP", "1", "untimed warm-up calls"),
    "acc-images": ("SCC_BENCH_ACC_IMAGES", "32", "accuracy images (bundled model only; 0 = off)"),
    "acc-eps": ("SCC_BENCH_ACC_EPS", "1/255", "PGD-10 radius for the robust accuracy"),
    "backends": ("SCC_BENCH_BACKENDS", "eager,compiled,triton,onnx", "comma-separated backends"),
}


def pytest_addoption(parser):
    group = parser.getgroup("scc-bench", "scc benchmark sizes")
    for name, (env, default, text) in OPTIONS.items():
        group.addoption(f"--bench-{name}", default=None, help=f"{text} (env {env}, default {default})")


def _setting(config, name: str) -> str:
    env, default, _ = OPTIONS[name]
    value = config.getoption(f"--bench-{name}")
    return value if value is not None else os.environ.get(env, default)


def _int(config, name: str) -> int:
    text = _setting(config, name)
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"--bench-{name} must be an integer, got {text!r}") from None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        models = [m.strip() for m in _setting(metafunc.config, "models").split(",") if m.strip()]
        try:
            specs = parse_defenses(_setting(metafunc.config, "defenses"))
        except SccError as err:
            raise pytest.UsageError(str(err)) from None
        try:
            backends = parse_backends(_setting(metafunc.config, "backends"))
        except SccError as err:
            raise pytest.UsageError(str(err)) from None
        cases = [(m, s, b) for m in models for s in specs for b in backends
                 if supports(DEFENSES[split_spec(s)[0]], b)]
        metafunc.parametrize("case", cases, ids=[f"{m}-{s}-{b}" for m, s, b in cases])


@pytest.fixture(scope="session")
def bench_settings(pytestconfig):
    from scc.eval.options import parse_eps

    pretrained = _setting(pytestconfig, "pretrained")
    return {"pretrained": None if pretrained in ("", "none") else pretrained,
            "images": _int(pytestconfig, "images"), "batch_size": _int(pytestconfig, "batch-size"),
            "device": _setting(pytestconfig, "device"), "warmup": _int(pytestconfig, "warmup"),
            "acc_images": _int(pytestconfig, "acc-images"), "acc_eps": parse_eps(_setting(pytestconfig, "acc-eps"))}


@pytest.fixture(scope="session")
def bench_data(bench_settings):
    """model -> dict(clf, x, pixels, acc (clean x, adversarial x, y) or None), built once per session."""
    cache: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in cache:
            s = bench_settings
            n = max(s["images"], s["acc_images"])
            clf, x, y, pixels = prepare(model, s["pretrained"], n, s["device"])
            entry = {"clf": clf, "x": x[: s["images"]], "pixels": pixels, "acc": None}
            n_acc = s["acc_images"] - s["acc_images"] % s["batch_size"]
            if y is not None and n_acc > 0:  # real labels: accuracy is cheap on the bundled model
                from scc.attacks import pgd

                xa, ya = x[:n_acc], y[:n_acc]
                gen = torch.Generator(device=xa.device).manual_seed(0)
                adv = torch.cat([pgd(clf, xa[i: i + 64], ya[i: i + 64], eps=s["acc_eps"], alpha=1 / 255, steps=10,
                                     generator=gen) for i in range(0, n_acc, 64)])
                entry["acc"] = (xa, adv, ya)
            cache[model] = entry
        return cache[model]

    return get


def _accuracy(run, defended, x, y, batch_size) -> float:
    correct = 0
    with torch.no_grad():
        for b, t in zip(batches_of(x, batch_size), batches_of(y, batch_size)):
            correct += (run(b, defended.draws(b)).argmax(-1).to(t.device) == t).sum().item()
    return correct / len(y)


@pytest.fixture
def measure(benchmark, case, bench_settings, bench_data):
    """measure(): benchmark `case` = (model, defense, backend) via scc.backends.make_runner and scc.timing."""

    def run_case() -> None:
        model, spec, backend = case
        s = bench_settings
        data = bench_data(model)
        clf, bs = data["clf"], s["batch_size"]
        name, preset = split_spec(spec)
        defended = defend(clf, name, preset=preset, seed=0)
        try:
            batches = batches_of(data["x"], bs)
        except SccError as err:
            raise pytest.UsageError(str(err)) from None
        draws = [defended.draws(b) for b in batches]
        try:
            run = make_runner(defended, backend, bs)
        except BackendUnavailable as err:  # only a missing module: unsupported pairs are never generated
            pytest.skip(str(err))
        device = batches[0].device
        warmup_s = warm_up(lambda: run(batches[0], draws[0]), device, s["warmup"])
        calls = itertools.cycle(zip(batches, draws))

        def setup():
            return next(calls), {}

        def target(x, d):
            return timed_call(lambda: run(x, d), device)[1]

        benchmark.group = model
        with torch.no_grad():
            benchmark.pedantic(target, setup=setup, rounds=len(batches), iterations=1)
            agreement = None  # eager is the reference
            if backend != "eager":  # top-1 of this backend vs eager on the same images and draws (untimed)
                agreement = top1_agreement(torch.cat([run(b, d) for b, d in zip(batches, draws)]),
                                           torch.cat([defended(b, d) for b, d in zip(batches, draws)]))
        info = benchmark.extra_info
        stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
        if stats is not None and stats.data:
            summary = summarize(stats.data, per=bs)
            info.update(s_per_image=summary["median"], p20=summary["p20"], p80=summary["p80"])
        info.update(model=model, pretrained=s["pretrained"], defense=name, preset=preset, spec=spec, backend=backend,
                    batch_size=bs, n_images=len(batches) * bs, pixels=data["pixels"],
                    compile_s=run.compile_seconds, warmup_s=warmup_s, top1_agreement=agreement,
                    hardware=hardware(device), versions=versions())
        if data["acc"] is not None:
            x_clean, x_adv, y = data["acc"]
            info.update(clean_acc=_accuracy(run, defended, x_clean, y, bs),
                        robust_acc=_accuracy(run, defended, x_adv, y, bs), acc_images=len(y),
                        attack=f"PGD-10 eps {s['acc_eps'] * 255:g}/255 step 1/255 on the undefended model")

    return run_case

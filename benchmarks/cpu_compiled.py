"""Eager vs scc.backends.compiled.Engine per-image latency on this CPU, same draws, answers compared.

    .venv/bin/python benchmarks/cpu_compiled.py                                   # bundled model, B = 1 and 8
    .venv/bin/python benchmarks/cpu_compiled.py --model ViT-B-32 --defenses ttc --batch-sizes 1 --calls 3
    .venv/bin/python benchmarks/cpu_compiled.py --model ViT-B-32 --defenses ttc --batch-sizes 1 --threads 2 \
        --modes default,max-autotune-no-cudagraphs --json benchmarks/results/cpu-compile-modes-vitb32.json

Timing (scc.timing): after the engine's warm-up (its compile time is reported separately), eager and compiled
calls alternate in rounds, so both see the same machine load; each side reports the median and p20/p80 of all
its calls. One intra-op thread by default (see --threads), recorded with the hardware and versions in
benchmarks/results/cpu-compiled-<model>.json (or --json), the model spelt vitb32, scc-tiny-digits, ...
`--modes` builds one engine per Inductor compile mode and times them in the same rounds:
max-autotune-no-cudagraphs lets Inductor choose, per matmul shape, between its C++ GEMM templates and the
ATen/MKL kernel by timing both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import scc
from scc.backends import make_runner
from scc.backends.compiled import MODES
from scc.bench.report import model_slug
from scc.data import DTD_CLASSES, load_dataset
from scc.defenses import split_spec
from scc.metrics import top1_agreement
from scc.precision import DTYPES, dtype_name
from scc.provenance import hardware, versions
from scc.timing import summarize, time_calls

RESULTS = Path(__file__).resolve().parent / "results"


def classifier(model: str) -> tuple[scc.ZeroShotClassifier, torch.Tensor]:
    """The classifier and a pool of input images: held-out digits for the bundled model, random pixels else."""
    if model == "scc-tiny-digits":
        return scc.load(model), load_dataset("digits", 32).images
    clf = scc.load(model, pretrained=None, labels=list(DTD_CLASSES), templates=["A surface with a {} texture."])
    gen = torch.Generator().manual_seed(0)
    return clf, torch.rand(16, 3, clf.image_size, clf.image_size, generator=gen)


def measure(clf, images, defense: str, batch: int, calls: int, rounds: int, backend: str,
            modes: list[str | None], dtype: torch.dtype) -> list[dict]:
    """One row per compile mode: that engine against eager (same dtype, draws and rounds)."""
    defended = scc.defend(clf, defense, seed=0)
    x = images[:batch]
    draws = defended.draws(x)
    eager = make_runner(defended, "eager", batch, dtype=dtype)
    engines = [make_runner(defended, backend, batch, dtype=dtype, mode=mode) for mode in modes]
    with torch.no_grad():
        eager_out, outs = eager(x, draws), [engine(x, draws) for engine in engines]
    eager_t, engine_t = [], [[] for _ in engines]
    for _ in range(rounds):  # alternate, so every side shares the machine's load
        eager_t += time_calls(lambda: eager(x, draws), x.device, calls)
        for engine, seconds in zip(engines, engine_t):
            seconds += time_calls(lambda: engine(x, draws), x.device, calls)
    e = summarize(eager_t, per=batch)
    rows = []
    for mode, engine, out, seconds in zip(modes, engines, outs, engine_t):
        c = summarize(seconds, per=batch)
        rows.append({"defense": split_spec(defense)[0], "spec": defense, "batch": batch, "backend": backend,
                     "mode": mode, "dtype": dtype_name(dtype), "compile_s": round(engine.compile_seconds, 2),
                     "eager_ms_per_image": round(e["median"] * 1e3, 3),
                     "eager_p20_p80_ms": [round(e["p20"] * 1e3, 3), round(e["p80"] * 1e3, 3)],
                     "engine_ms_per_image": round(c["median"] * 1e3, 3),
                     "engine_p20_p80_ms": [round(c["p20"] * 1e3, 3), round(c["p80"] * 1e3, 3)],
                     "speedup": round(e["median"] / c["median"], 2), "timed_calls_each": c["calls"],
                     "top1_agreement": top1_agreement(eager_out, out), "reference": "eager, same dtype, same draws",
                     "max_abs_logit_diff": (eager_out.float() - out.float()).abs().max().item(),
                     "kernels": engine.details["kernels"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="scc-tiny-digits")
    p.add_argument("--defenses", default="ttc,scc,scc-latency")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--backend", default="compiled", choices=("compiled", "triton"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating eager/engine rounds (median over all calls)")
    p.add_argument("--modes", default="default",
                   help="compile modes, each its own engine in the same rounds: default, max-autotune-no-cudagraphs")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--json", default=None, help="default: benchmarks/results/cpu-compiled-<model>.json")
    args = p.parse_args()
    modes = [None if m == "default" else m for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown compile mode(s) {unknown}; choose from " + ", ".join(m for m in MODES if m))
    out = Path(args.json) if args.json else RESULTS / f"cpu-compiled-{model_slug(args.model)}.json"
    if not out.parent.is_dir():
        p.error(f"--json {out}: folder {out.parent} does not exist; create it or pick another path")
    torch.set_num_threads(args.threads)
    clf, images = classifier(args.model)
    rows = []
    for defense in args.defenses.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for row in measure(clf, images, defense, batch, args.calls, args.rounds, args.backend, modes,
                               DTYPES[args.dtype]):
                print(json.dumps(row), flush=True)
                rows.append(row)
    out.write_text(json.dumps({"model": args.model, "threads": args.threads, "hardware": hardware("cpu"),
                               "versions": versions(), "statistic": "median over calls, p20/p80 beside it",
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

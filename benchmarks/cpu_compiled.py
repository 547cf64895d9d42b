"""Eager vs scc.backends.compiled.Engine per-image latency on this CPU, same draws, answers compared.

    .venv/bin/python benchmarks/cpu_compiled.py                                   # bundled model, B = 1 and 8
    .venv/bin/python benchmarks/cpu_compiled.py --model ViT-B-32 --defenses ttc --batch-sizes 1 --calls 3

Timing (scc.timing): after the engine's warm-up (its compile time is reported separately), eager and compiled
calls alternate in rounds, so both see the same machine load; each side reports the median and p20/p80 of all
its calls. One intra-op thread by default (see --threads), recorded with the hardware and versions in
benchmarks/results/cpu-compiled-<model>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import scc
from scc.backends import make_runner
from scc.data import DTD_CLASSES, load_dataset
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


def measure(clf, images, defense: str, batch: int, calls: int, rounds: int, backend: str) -> dict:
    defended = scc.defend(clf, defense, seed=0)
    x = images[:batch]
    draws = defended.draws(x)
    eager, engine = make_runner(defended, "eager", batch), make_runner(defended, backend, batch)
    with torch.no_grad():
        eager_out, engine_out = eager(x, draws), engine(x, draws)
    eager_t, engine_t = [], []
    for _ in range(rounds):  # alternate, so both sides share the machine's load
        eager_t += time_calls(lambda: eager(x, draws), x.device, calls)
        engine_t += time_calls(lambda: engine(x, draws), x.device, calls)
    e, c = summarize(eager_t, per=batch), summarize(engine_t, per=batch)
    return {"defense": defense, "batch": batch, "backend": backend, "compile_s": round(engine.compile_seconds, 2),
            "eager_ms_per_image": round(e["median"] * 1e3, 3),
            "eager_p20_p80_ms": [round(e["p20"] * 1e3, 3), round(e["p80"] * 1e3, 3)],
            "engine_ms_per_image": round(c["median"] * 1e3, 3),
            "engine_p20_p80_ms": [round(c["p20"] * 1e3, 3), round(c["p80"] * 1e3, 3)],
            "speedup": round(e["median"] / c["median"], 2), "timed_calls_each": c["calls"],
            "top1_agreement": (eager_out.argmax(1) == engine_out.argmax(1)).float().mean().item(),
            "max_abs_logit_diff": (eager_out - engine_out).abs().max().item(), "kernels": engine.details["kernels"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="scc-tiny-digits")
    p.add_argument("--defenses", default="ttc,scc,scc-latency")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--backend", default="compiled", choices=("compiled", "triton"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating eager/engine rounds (median over all calls)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clf, images = classifier(args.model)
    rows = []
    for defense in args.defenses.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            row = measure(clf, images, defense, batch, args.calls, args.rounds, args.backend)
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu-compiled-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "threads": args.threads, "hardware": hardware("cpu"),
                               "versions": versions(), "statistic": "median over calls, p20/p80 beside it",
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Eager vs scc.compiled.Engine per-image latency on this CPU, same draws, answers compared.

    .venv/bin/python benchmarks/cpu_compiled.py                                   # bundled model, B = 1 and 8
    .venv/bin/python benchmarks/cpu_compiled.py --model ViT-B-32 --defenses ttc --batch-sizes 1 --calls 3

Timing: after the engine's warm-up (its compile time is reported separately), eager and compiled calls
alternate in rounds and each keeps its best round (the machine is shared: the minimum is the least disturbed
estimate). One intra-op thread by default (see --threads). Writes benchmarks/results/cpu-compiled-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import scc
from scc.compiled import Engine
from scc.data import DTD_CLASSES, load_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def classifier(model: str) -> tuple[scc.ZeroShotClassifier, torch.Tensor]:
    """The classifier and a pool of input images: held-out digits for the bundled model, random pixels else."""
    if model == "scc-tiny-digits":
        return scc.load(model), load_dataset("digits", 32).images
    clf = scc.load(model, pretrained=None, labels=list(DTD_CLASSES), templates=["A surface with a {} texture."])
    gen = torch.Generator().manual_seed(0)
    return clf, torch.rand(16, 3, clf.image_size, clf.image_size, generator=gen)


def best_round(fn, calls: int, rounds_done: list[float]) -> None:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    rounds_done.append((time.perf_counter() - start) / calls)


def measure(clf, images, defense: str, batch: int, calls: int, rounds: int, backend: str) -> dict:
    defended = scc.defend(clf, defense, seed=0)
    x = images[:batch]
    draws = defended.draws(x)
    engine = Engine(defended, backend=backend, max_batch=batch)
    compile_s = engine.warmup(batch)
    eager_out, engine_out = defended(x, draws), engine(x, draws)
    eager_t, engine_t = [], []
    for _ in range(rounds):
        best_round(lambda: defended(x, draws), calls, eager_t)
        best_round(lambda: engine(x, draws), calls, engine_t)
    eager_s, engine_s = min(eager_t), min(engine_t)
    return {"defense": defense, "batch": batch, "backend": backend, "compile_s": round(compile_s, 2),
            "eager_ms_per_image": round(eager_s / batch * 1e3, 3), "engine_ms_per_image": round(engine_s / batch * 1e3, 3),
            "speedup": round(eager_s / engine_s, 2),
            "top1_agreement": (eager_out.argmax(1) == engine_out.argmax(1)).float().mean().item(),
            "max_abs_logit_diff": (eager_out - engine_out).abs().max().item(), "kernels": engine.kernels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="scc-tiny-digits")
    p.add_argument("--defenses", default="ttc,scc,scc-latency")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--backend", default="compiled", choices=("compiled", "triton"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; each side keeps its best")
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
    out.write_text(json.dumps({"model": args.model, "threads": args.threads, "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

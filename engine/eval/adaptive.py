"""Robustness under an adaptive attacker: attacks that see the defense, scored with the attacker's draws
and with fresh ones, the per-image worst case, sanity flags, and the report (JSON, Markdown, PNG).

    report = scc.eval.adaptive.evaluate(model="scc-tiny-digits", dataset="digits",
                                        defenses=["none", "ttc", "scc"], eps_list=[4 / 255], n_images=100, seed=0)
    scc.eval.report.write_report(report, "out/")     # report.json, report.md, acc_vs_eps.png, acc_vs_steps.png

The image tower runs in `dtype` for the attacks and the scoring alike (the attacks differentiate through the eager
module at that precision); `backend` runs the scoring (scc.backends), so a compiled or exported engine is scored
on the adversarial images that the eager module's gradients found.

Threat models (the `protocol` and `draws` fields of every row):
  paper     non-adaptive: adversarial images made on the undefended classifier (scc.eval.paper); the attack
            never sees the defense, so these numbers are not a robustness claim.
  adaptive  the attack runs through the `Defended` module (white box: exact gradients through the defense's own
            gradient steps, or black box: Square), scored
              known  with the draws the attacker used: the defense's seed and the images' keys (the worst case,
                     a leaked seed; for attacks that do not use the draws, EOT and Square's fresh queries, the
                     defense's own seed);
              fresh  with a new seed at evaluation (a secret the attacker never saw; with a fixed --seed it is
                     derived from it so that runs and shards are reproducible).
  worst     per image, per draws: robust only if it is correct on the clean image and survived every attack.

The suite and its per-batch evaluation: scc.eval.suite; the report (table, Markdown, plots): scc.eval.report.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import torch

from ..data import classifier_for, load_dataset
from ..errors import SccError
from ..models import image_size_of
from ..precision import dtype_name
from ..provenance import hardware, versions
from .options import ADAPTIVE_ATTACKS
from .sharding import run_local, run_ray
from .suite import Suite, accuracy_of, build_rows, curves_of, evaluate_batches, jobs_of, plan_batches, sanity_flags


def evaluate(model: str = "scc-tiny-digits", pretrained: str | None = None, dataset: str = "digits",
             defenses: Sequence[str] = ("none", "ttc", "scc"), eps_list: Sequence[float] = (4 / 255,),
             n_images: int | None = None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
             suite: Suite | None = None, progress: bool = True, templates: Sequence[str] | None = None,
             ray_address: str | None = None, log: Callable[[str], None] = print, workers: int = 1,
             threads: int | None = None, dtype: torch.dtype = torch.float32, backend: str = "eager") -> dict:
    """The adaptive protocol end to end; returns the JSON-ready report (see the module docstring)."""
    suite = suite or Suite()
    unknown = [a for a in suite.attacks if a not in ADAPTIVE_ATTACKS]
    if unknown:
        raise SccError(f"unknown adaptive attack(s) {unknown}; choose from {', '.join(ADAPTIVE_ATTACKS)}")
    data = load_dataset(dataset, image_size_of(model), n_images)
    clf = classifier_for(data, model, pretrained, templates, device)
    x_all, y_all = data.images.to(device), data.targets.to(device)
    if workers < 1:
        raise SccError(f"workers must be a positive number of processes, got {workers!r}")
    if workers > 1 and not ray_address:  # batches small enough that every worker gets several: the pool balances
        batch_size = max(1, min(batch_size, math.ceil(len(y_all) / (2 * workers))))
    batches = plan_batches(len(y_all), batch_size)
    started = time.perf_counter()

    def estimate(per_image: dict) -> None:
        n = len(y_all)
        lines = [f"estimated cost (timed on a first batch of {batches[0][1] - batches[0][0]} images, extrapolated to "
                 f"{n}; an upper bound: larger batches cost less per image):"]
        total = 0.0
        for (label, eps, attack), (spi, cpu) in sorted(per_image.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {attack:<19} {label:<12} eps={eps * 255:g}/255  {spi:8.3f} s/image ({cpu:.3f} CPU s)"
                         f"  ~{spi * n:7.0f} s")
            total += spi * n
        if workers > 1 and not ray_address:
            lines.append(f"  total ~{total / 60:.1f} min of attack time in one process; ~{total / 60 / workers:.1f} "
                         f"min of wall time over {workers} worker processes ({threads or 1} thread(s) each)")
        else:
            lines.append(f"  total ~{total / 60:.1f} min of attack time on {torch.get_num_threads()} thread(s)"
                         + (" (split over the Ray workers)" if ray_address else ""))
        log("\n".join(lines))

    # what a worker process or Ray task needs to rebuild the classifier and images (loaded above: fail fast here)
    load_kw = dict(model=model, pretrained=pretrained, dataset=dataset, n_images=n_images, templates=templates,
                   device=device, dtype=dtype_name(dtype), backend=backend)
    if ray_address:
        raw = run_ray(ray_address, load_kw, defenses, eps_list, batches, seed, suite, progress, estimate)
    elif workers > 1:
        n_jobs = len(jobs_of(defenses, eps_list, suite, clf.num_classes))
        raw = run_local(workers, load_kw, defenses, eps_list, batches, seed, suite, progress, estimate, n_jobs,
                        threads or 1)
    else:
        raw = evaluate_batches(clf, defenses, eps_list, x_all, y_all, batches, seed, suite, progress, estimate,
                               dtype=dtype, backend=backend)
    report = {"protocol": "adaptive", "model": model, "pretrained": pretrained, "dataset": data.name,
              "n_images": len(y_all), "device": str(device), "dtype": dtype_name(dtype), "backend": backend,
              "seed": seed,
              "fresh_seed": "derived from seed (blake2b of seed and 'fresh-draws'); never seen by the attacker",
              "threads": (threads or 1) if workers > 1 and not ray_address else torch.get_num_threads(),
              "hardware": hardware(device), "versions": versions(extra=("ray", "matplotlib")),
              "batch_size": batch_size, "ray": ray_address, "workers": 1 if ray_address else workers,
              "wall_seconds": time.perf_counter() - started,
              "suite": dataclasses.asdict(suite),
              "results": build_rows(raw, defenses, eps_list, suite, backend, dtype), "steps_curves": curves_of(raw),
              "sanity_16": [{"defense": s, "eps": suite.sanity_eps, "steps": suite.sanity_steps,
                             "accuracy": accuracy_of(d)[0], "n": accuracy_of(d)[1]} for s, d in raw["sanity"].items()]}
    report["sanity"] = sanity_flags(report)
    return report

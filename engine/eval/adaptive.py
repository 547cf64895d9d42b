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
from ..defenses import DEFENSES, split_spec
from ..errors import SccError
from ..models import preprocessing_of
from ..precision import dtype_name
from ..provenance import hardware, versions
from .options import ADAPTIVE_ATTACKS
from .sharding import run_local, run_ray
from .suite import (Suite, accuracy_of, build_rows, curves_of, estimate_cost, evaluate_batches, images_of, jobs_of,
                    merge, name_on_backbone, plan_batches, sanity_flags)


def evaluate(model: str = "scc-tiny-digits", pretrained: str | None = None, dataset: str = "digits",
             defenses: Sequence[str] = ("none", "ttc", "scc"), eps_list: Sequence[float] = (4 / 255,),
             n_images: int | None = None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
             suite: Suite | None = None, progress: bool = True, templates: Sequence[str] | None = None,
             ray_address: str | None = None, log: Callable[[str], None] = print, workers: int = 1,
             threads: int | None = None, dtype: torch.dtype = torch.float32, backend: str = "eager",
             keep: Callable[[Callable[[], tuple]], None] | None = None,
             tau_reference: dict | None = None, backbone: str | None = None) -> dict:
    """The adaptive protocol end to end; returns the JSON-ready report (see the module docstring). The cost
    estimate goes to `log` before the work starts. `keep(snapshot)` is called once before the work:
    snapshot() -> (report of the batches finished so far, their images, all images, the missing image ranges),
    what a run cut short writes (scc.cli.interrupts). `tau_reference` ({"pretrained": P}): `pretrained` is a
    fine-tuned model and TTC's tau gate reads `model` loaded with P, its frozen original (scc.defenses.ttc).
    `backbone`: the column name of that fine-tuned model ('fare'): rows, curves and sanity lines are named as the
    columns were asked for ('fare', 'fare+ttc'; scc.eval.suite.name_on_backbone), partial reports included."""
    suite = suite or Suite()
    unknown = [a for a in suite.attacks if a not in ADAPTIVE_ATTACKS]
    if unknown:
        raise SccError(f"unknown adaptive attack(s) {unknown}; choose from {', '.join(ADAPTIVE_ATTACKS)}")
    data = load_dataset(dataset, preprocessing_of(model), n_images)
    clf = classifier_for(data, model, pretrained, templates, device)
    if tau_reference is not None:
        clf.tau_reference = classifier_for(data, model, tau_reference["pretrained"], templates, device)
    for spec in defenses:  # a defense this model cannot run fails before any attack
        DEFENSES[split_spec(spec)[0]].check(clf)
    x_all, y_all = data.images.to(device), data.targets.to(device)
    if workers < 1:
        raise SccError(f"workers must be a positive number of processes, got {workers!r}")
    if workers > 1 and not ray_address:  # batches small enough that every worker gets several: the pool balances
        batch_size = max(1, min(batch_size, math.ceil(len(y_all) / (2 * workers))))
    n = len(y_all)
    batches = plan_batches(n, batch_size)
    started = time.perf_counter()
    probe = slice(*batches[0])
    per_image = estimate_cost(clf, defenses, eps_list, x_all[probe], y_all[probe], suite, seed, dtype)
    log(cost_text(per_image, n, len(y_all[probe]), workers, threads, ray_address))  # before the work

    parts = []  # each finished batch's (or Ray shard's) results

    def report_of(raw: dict | None) -> dict:
        report = {"protocol": "adaptive", "model": model, "pretrained": pretrained,
                  **({"tau_reference": tau_reference} if tau_reference is not None else {}), "dataset": data.name,
                  "n_images": len(images_of(raw)) if raw else 0, "device": str(device), "dtype": dtype_name(dtype),
                  "backend": backend, "seed": seed,
                  "fresh_seed": "derived from seed (blake2b of seed and 'fresh-draws'); never seen by the attacker",
                  "threads": (threads or 1) if workers > 1 and not ray_address else torch.get_num_threads(),
                  "hardware": hardware(device), "versions": versions(extra=("ray", "matplotlib")),
                  "batch_size": batch_size, "ray": ray_address, "workers": 1 if ray_address else workers,
                  "wall_s": time.perf_counter() - started, "suite": dataclasses.asdict(suite),
                  "results": build_rows(raw, defenses, eps_list, suite, backend, dtype) if raw else [],
                  "steps_curves": curves_of(raw) if raw else [],
                  "sanity_16": [{"defense": split_spec(s)[0], "spec": s, "eps": suite.sanity_eps,
                                 "steps": suite.sanity_steps, "accuracy": accuracy_of(d)[0], "n": accuracy_of(d)[1]}
                                for s, d in (raw["sanity"].items() if raw else ())]}
        if backbone is not None:
            name_on_backbone(report, backbone)
        report["sanity"] = sanity_flags(report)
        return report

    if keep is not None:
        def snapshot():
            raw = merge(parts) if parts else None
            done = set(images_of(raw)) if raw else set()
            missing = [i for i in range(n) if i not in done]
            return report_of(raw), len(done), n, [f"images {span}" for span in spans(missing)]
        keep(snapshot)
    # what a worker process or Ray task needs to rebuild the classifier and images (loaded above: fail fast here)
    load_kw = dict(model=model, pretrained=pretrained, dataset=dataset, n_images=n_images, templates=templates,
                   device=device, dtype=dtype_name(dtype), backend=backend, tau_reference=tau_reference)
    if ray_address:
        raw = run_ray(ray_address, load_kw, defenses, eps_list, batches, seed, suite, progress, parts.append)
    elif workers > 1:
        n_jobs = len(jobs_of(defenses, eps_list, suite, clf.num_classes))
        raw = run_local(workers, load_kw, defenses, eps_list, batches, seed, suite, progress, n_jobs, threads or 1,
                        parts.append)
    else:
        raw = evaluate_batches(clf, defenses, eps_list, x_all, y_all, batches, seed, suite, progress, parts.append,
                               dtype=dtype, backend=backend)
    return report_of(raw)


def cost_text(per_image: dict, n: int, probe: int, workers: int, threads: int | None, ray_address: str | None) -> str:
    """The estimate of scc.eval.suite.estimate_cost for `n` images, one line per job, costliest first."""
    lines = [f"estimated cost (every attack timed with 2-step budgets on the first {probe} images, scaled to its "
             f"full budget and {n} images; an upper bound: larger batches cost less per image):"]
    for (label, eps, attack), (spi, cpu) in sorted(per_image.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {attack:<19} {label:<12} eps={eps * 255:g}/255  {spi:8.3f} s/image ({cpu:.3f} CPU s)"
                     f"  ~{spi * n:7.0f} s")
    total = sum(spi for spi, _ in per_image.values()) * n
    split = ""
    if ray_address:
        split = " (split over the Ray workers)"
    elif workers > 1:
        split = (f"; ~{total / 60 / workers:.1f} min of wall time over {workers} worker processes ({threads or 1} "
                 "thread(s) each)")
    lines.append(f"  total ~{total / 60:.1f} min of attack time on {torch.get_num_threads()} thread(s){split}")
    return "\n".join(lines)


def spans(indices: Sequence[int]) -> list[str]:
    """Sorted indices as ranges: [0, 1, 2, 5] -> ["0-2", "5"]."""
    out = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return [f"{a}-{b}" if a != b else f"{a}" for a, b in out]

"""Robustness evaluation in the TTC protocol (the paper's): attacks against the undefended classifier, then each
defense on the result. Non-adaptive: the attack never sees the defense, so these numbers reproduce the paper's
tables and are not a robustness claim (scc.eval.adaptive is).

    report = scc.eval.paper.run(model="scc-tiny-digits", dataset="digits", defenses=["none", "ttc", "scc"],
                                attacks=[("none", 0), ("pgd", 1/255), ("pgd", 4/255)])
    print(format_table(report))

Adversarial images are made once per (attack, eps) against the plain classifier and shared by every defense.
`seconds_per_image` times the defense alone (not the attack), on the chosen backend and dtype.

Attacks (scc.eval.options.PAPER_ATTACKS): pgd and cw (`attack_steps`, default 10, step 1/255), pgd100 (PGD-100,
step 1/255), and the TTC protocol's AutoAttack subset apgd-ce and apgd-dlr (APGD, 100 iterations, 1 restart;
apgd-dlr needs >= 3 classes and is skipped, with a note in the report, on 2-class tasks). Every row says
`"protocol": "paper"` and `"draws": null`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from ..attacks import apgd, attack as run_attack
from ..backends import make_runner
from ..data import classifier_for, load_dataset
from ..defenses import defend, label_of, split_label
from ..errors import SccError
from ..models import image_size_of
from ..precision import dtype_name
from ..provenance import hardware, versions
from ..timing import timed_call
from .options import NON_ADAPTIVE_WARNING, PAPER_ATTACKS, stderr


def run(model: str = "scc-tiny-digits", pretrained: str | None = None, dataset: str = "digits",
        defenses: Sequence[str] = ("none", "ttc", "scc"), attacks: Sequence[tuple[str, float]] = (("none", 0.0),),
        n_images: int | None = None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
        attack_steps: int = 10, progress: bool = True, templates: Sequence[str] | None = None,
        backend: str = "eager", dtype: torch.dtype = torch.float32) -> dict:
    """Clean/robust accuracy and per-image defense time on `backend` (scc.backends); returns the JSON-ready
    result dict."""
    for key, value in (("n_images", n_images), ("batch_size", batch_size), ("attack_steps", attack_steps)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SccError(f"{key} must be a positive integer" + (" or None (all images)" if key == "n_images" else "")
                           + f", got {value!r}")
    data = load_dataset(dataset, image_size_of(model), n_images)
    clf = classifier_for(data, model, pretrained, templates, device, seed)
    x_all, y_all = data.images.to(device), data.targets.to(device)
    gen = torch.Generator(device=x_all.device).manual_seed(seed)
    results, skipped, runners = [], [], {}
    for attack_name, eps in attacks:
        if attack_name != "none" and attack_name not in PAPER_ATTACKS:
            raise SccError(f"unknown attack {attack_name!r}; choose from {', '.join(PAPER_ATTACKS)}")
        if attack_name == "apgd-dlr" and len(data.classes) < 3:
            skipped.append(f"apgd-dlr skipped at eps={eps:.4f}: the DLR loss needs >= 3 classes")
            continue
        steps = {"none": 0, "pgd100": 100, "apgd-ce": 100, "apgd-dlr": 100}.get(attack_name, attack_steps)
        batches = []
        for i in tqdm(range(0, len(y_all), batch_size), desc=f"attack {attack_name} eps={eps:.4f}",
                      disable=not progress or attack_name == "none", leave=False):
            x, y = x_all[i: i + batch_size], y_all[i: i + batch_size]
            if attack_name.startswith("apgd"):
                x = apgd(clf, x, y, eps, loss=attack_name.split("-")[1], steps=100, seed=seed)
            elif attack_name == "pgd100":
                x = run_attack(clf, x, y, "pgd", eps=eps, alpha=1 / 255, steps=100, generator=gen)
            elif attack_name != "none":
                x = run_attack(clf, x, y, attack_name, eps=eps, alpha=1 / 255, steps=attack_steps, generator=gen)
            batches.append((x, y))
        for label in defenses:
            name, preset = split_label(label)
            if label not in runners:  # built (and compiled) once per defense, whatever the attacks
                defended = defend(clf, name, preset=preset, seed=seed)
                runners[label] = defended, make_runner(defended, backend, min(batch_size, len(y_all)), dtype=dtype)
            defended, runner = runners[label]
            correct, seconds, lo = 0, 0.0, 0
            for x, y in tqdm(batches, desc=f"{label} on {attack_name}", disable=not progress, leave=False):
                keys = range(lo, lo + len(y))  # image i's draws come from key i, its dataset index
                with torch.no_grad():  # the draws are part of the defense's time, as in production
                    t, logits = timed_call(lambda: runner(x, defended.draws(x, keys)), x.device)
                lo += len(y)
                seconds += t
                correct += (logits.argmax(1) == y).sum().item()
            acc = correct / len(y_all)
            results.append({"defense": name, "preset": preset, "backend": backend, "dtype": dtype_name(dtype),
                            "attack": attack_name, "eps": eps,
                            "accuracy": acc, "seconds_per_image": seconds / len(y_all), "protocol": "paper",
                            "draws": None, "steps": steps, "stderr": stderr(acc, len(y_all))})
    report = {"protocol": "paper", "model": model, "pretrained": pretrained, "dataset": data.name,
              "n_images": len(y_all), "device": str(device), "backend": backend, "dtype": dtype_name(dtype),
              "seed": seed, "hardware": hardware(device), "versions": versions(), "threads": torch.get_num_threads(),
              "results": results}
    if skipped:
        report["skipped"] = skipped
    if any(r["attack"] != "none" for r in results):
        report["warning"] = NON_ADAPTIVE_WARNING
    return report


def format_table(report: dict) -> str:
    """Rows = defenses, columns = clean / each attack accuracy, then seconds per image."""
    cols = []
    for r in report["results"]:
        key = (r["attack"], r["eps"])
        if key not in cols:
            cols.append(key)
    rows: dict[str, dict] = {}
    for r in report["results"]:
        label = label_of(r["defense"], r["preset"])
        rows.setdefault(label, {})[(r["attack"], r["eps"])] = r
    names = ["clean" if a == "none" else f"{a.upper()} {round(e * 255, 2):g}/255" for a, e in cols]
    head = f"{'defense':<14}" + "".join(f"{n:>14}" for n in names) + f"{'s/image':>11}"
    lines = [head, "-" * len(head)]
    for label, cells in rows.items():
        accs = "".join(f"{100 * cells[c]['accuracy']:>13.1f}%" if c in cells else f"{'-':>14}" for c in cols)
        spi = sum(c["seconds_per_image"] for c in cells.values()) / len(cells)
        lines.append(f"{label:<14}{accs}{spi:>11.4f}")
    return "\n".join(lines)

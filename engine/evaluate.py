"""Robustness evaluation in the TTC protocol: attacks against the undefended classifier, then each defense.

    scc.evaluate.run(model="scc-tiny-digits", dataset="digits", defenses=["none", "ttc", "scc"],
                     attacks=[("none", 0), ("pgd", 1/255), ("pgd", 4/255)])

Adversarial images are made once per (attack, eps) against the plain classifier (non-adaptive, as in the
paper) and shared by every defense. `seconds_per_image` times the defense alone (not the attack).

Attacks (the paper protocol): pgd and cw (`attack_steps`, default 10, step 1/255), pgd100 (PGD-100, step 1/255),
and the TTC protocol's AutoAttack subset apgd-ce and apgd-dlr (torchattacks' APGD, 100 iterations, 1 restart;
apgd-dlr needs >= 3 classes and is skipped, with a note in the report, on 2-class tasks). Every row says
`"protocol": "paper"` and `"draws": null`; the adaptive protocol (attacks that see the defense) is
scc.adaptive.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

import math

from .attacks import attack as run_attack
from .backends import dtype_name, make_runner
from .data import classifier_for, load_dataset
from .defenses import defend, split_defense_name
from .env import hardware, versions
from .models import SccError, image_size_of
from .timing import timed_call

PAPER_ATTACKS = ("none", "pgd", "cw", "pgd100", "apgd-ce", "apgd-dlr")
NON_ADAPTIVE_WARNING = ("warning: every attack here was made on the undefended classifier and never saw the defense, "
                        "so this is not a robustness claim; for one run `scc eval --protocol adaptive` (attacks "
                        "through the defense, known and fresh draws)")


def parse_eps(text: str) -> float:
    """An attack radius in [0,1] pixel units, written so that its unit is never guessed:

    - a fraction of 255 levels: `4/255` (any `a/b`);
    - a pixel fraction below 1 with a decimal point: `0.0157`;
    - `0` (no perturbation).
    Bare integers (`4`) and values >= 1 (`1.0`) are refused with a hint (write 4/255); so are negative values
    (on the command line a value starting with '-' needs '=': `--eps=-4/255`, which is then refused).
    """
    text = str(text).strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise SccError(f"bad eps {text!r}: write a fraction of 255 levels like 4/255, or a pixel fraction "
                       "below 1 like 0.0157") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SccError(f"bad eps {text!r}: write e.g. 4/255")
    if value < 0:
        raise SccError(f"eps must be >= 0, got {text}: an attack radius cannot be negative")
    if "/" not in text and value != 0:
        if value >= 1 or "." not in text:
            levels = value if value >= 1 else value * 255
            raise SccError(f"ambiguous eps {text!r}: write {levels:g}/255 for {levels:g} of 255 levels, or a pixel "
                           "fraction below 1 with a decimal point (e.g. 0.0157)")
    if value > 1:
        raise SccError(f"eps must be in [0,1] pixel units, got {text} = {value:.4g}")
    return value


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
    results, skipped = [], []
    for attack_name, eps in attacks:
        if attack_name not in PAPER_ATTACKS:
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
                import torchattacks

                x = torchattacks.APGD(clf, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed,
                                      loss=attack_name.split("-")[1])(x, y)
            elif attack_name == "pgd100":
                x = run_attack(clf, x, y, "pgd", eps=eps, alpha=1 / 255, steps=100, generator=gen)
            elif attack_name != "none":
                x = run_attack(clf, x, y, attack_name, eps=eps, alpha=1 / 255, steps=attack_steps, generator=gen)
            batches.append((x, y))
        for spec in defenses:
            name, preset = split_defense_name(spec)
            defended = defend(clf, name, preset=preset, seed=seed)
            runner = make_runner(defended, backend, min(batch_size, len(y_all)), dtype=dtype)
            correct, seconds = 0, 0.0
            for x, y in tqdm(batches, desc=f"{spec} on {attack_name}", disable=not progress, leave=False):
                with torch.no_grad():
                    t, logits = timed_call(lambda: runner(x), x.device)
                pred = logits.argmax(1)
                seconds += t
                correct += (pred == y).sum().item()
            acc = correct / len(y_all)
            results.append({"defense": name, "preset": preset, "backend": backend, "dtype": dtype_name(dtype),
                            "attack": attack_name, "eps": eps,
                            "accuracy": acc, "seconds_per_image": seconds / len(y_all), "protocol": "paper",
                            "draws": None, "steps": steps, "stderr": math.sqrt(acc * (1 - acc) / len(y_all))})
    report = {"protocol": "paper", "model": model, "pretrained": pretrained, "dataset": data.name, "n_images": len(y_all),
            "device": str(device), "seed": seed, "hardware": hardware(device), "versions": versions(),
            "threads": torch.get_num_threads(), "results": results}
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
        label = r["defense"] + ("" if r["preset"] == "paper" else f"-{r['preset']}")
        rows.setdefault(label, {})[(r["attack"], r["eps"])] = r
    names = ["clean" if a == "none" else f"{a.upper()} {round(e * 255, 2):g}/255" for a, e in cols]
    head = f"{'defense':<14}" + "".join(f"{n:>14}" for n in names) + f"{'s/image':>11}"
    lines = [head, "-" * len(head)]
    for label, cells in rows.items():
        accs = "".join(f"{100 * cells[c]['accuracy']:>13.1f}%" if c in cells else f"{'-':>14}" for c in cols)
        spi = sum(c["seconds_per_image"] for c in cells.values()) / len(cells)
        lines.append(f"{label:<14}{accs}{spi:>11.4f}")
    return "\n".join(lines)

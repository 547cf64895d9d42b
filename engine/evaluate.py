"""Robustness evaluation in the TTC protocol: attacks against the undefended classifier, then each defense.

    scc.evaluate.run(model="scc-tiny-digits", dataset="digits", defenses=["none", "ttc", "scc"],
                     attacks=[("none", 0), ("pgd", 1/255), ("pgd", 4/255)])

Adversarial images are made once per (attack, eps) against the plain classifier (non-adaptive, as in the
paper) and shared by every defense. `seconds_per_image` times the defense alone (not the attack).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm import tqdm

from .attacks import attack as run_attack
from .data import load_dataset
from .defenses import defend, split_defense_name
from .models import SccError, bundled_meta, image_size_of, is_bundled, load


def parse_eps(text: str) -> float:
    """'4/255' | '0.0157' | '4' (integers > 1 are read as /255) -> eps in [0,1] pixel units."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
            value = value / 255 if value >= 1 else value
    except ValueError:
        raise SccError(f"bad eps {text!r}: write e.g. 1/255 or 0.0039") from None
    if not 0 <= value <= 1:
        raise SccError(f"eps must be in [0,1] pixel units, got {text}")
    return value


def run(model: str = "scc-tiny-digits", pretrained: str | None = None, dataset: str = "digits",
        defenses: Sequence[str] = ("none", "ttc", "scc"), attacks: Sequence[tuple[str, float]] = (("none", 0.0),),
        n_images: int | None = None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
        attack_steps: int = 10, progress: bool = True, templates: Sequence[str] | None = None) -> dict:
    """Clean/robust accuracy and per-image defense time; returns the JSON-ready result dict."""
    data = load_dataset(dataset, image_size_of(model), n_images)
    if is_bundled(model) and templates is None:
        templates = bundled_meta(model)["eval_templates"]  # its vocabulary covers its own prompts only
    clf = load(model, pretrained, labels=data.classes, templates=templates or data.templates, device=device)
    x_all, y_all = data.images.to(device), data.targets.to(device)
    gen = torch.Generator(device=x_all.device).manual_seed(seed)
    results = []
    for attack_name, eps in attacks:
        if attack_name not in ("none", "pgd", "cw"):
            raise SccError(f"unknown attack {attack_name!r}; choose none, pgd or cw")
        batches = []
        for i in tqdm(range(0, len(y_all), batch_size), desc=f"attack {attack_name} eps={eps:.4f}",
                      disable=not progress or attack_name == "none", leave=False):
            x, y = x_all[i: i + batch_size], y_all[i: i + batch_size]
            if attack_name != "none":
                x = run_attack(clf, x, y, attack_name, eps=eps, alpha=1 / 255, steps=attack_steps, generator=gen)
            batches.append((x, y))
        for spec in defenses:
            name, preset = split_defense_name(spec)
            defended = defend(clf, name, preset=preset, seed=seed)
            correct, seconds = 0, 0.0
            for x, y in tqdm(batches, desc=f"{spec} on {attack_name}", disable=not progress, leave=False):
                t0 = time.perf_counter()
                with torch.no_grad():
                    pred = defended(x).argmax(1)
                if x.is_cuda:
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
                correct += (pred == y).sum().item()
            results.append({"defense": name, "preset": preset, "attack": attack_name, "eps": eps,
                            "accuracy": correct / len(y_all), "seconds_per_image": seconds / len(y_all)})
    from .bench import versions

    return {"model": model, "pretrained": pretrained, "dataset": data.name, "n_images": len(y_all),
            "device": str(device), "versions": versions(), "results": results}


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

"""AutoAttack (Croce & Hein, ICML 2020) from our own components, L_inf: the standard sequence and TTC's subset.

    adv, log = run_sequence(model, x, y, eps=4/255, components=STANDARD, seed=0)   # APGD-CE, APGD-T, FAB-T, Square
    adv, log = run_sequence(model, x, y, eps=1/255, components=TTC_SUBSET)         # APGD-CE, APGD-DLR (TTC's)
    adv = run_component("apgd-t", model, x, y, eps, Settings(), seed=0)

As the official `run_standard_evaluation` does, each component runs only on the images still classified correctly
(after the clean check and every earlier component), and an image keeps the first component's adversarial image
that fooled the model; images nothing fooled are returned clean. Every component gets the same seed.

Settings (`Settings`, the official standard version's; written into every report that uses them):
    apgd-ce   APGD on cross-entropy, 100 iterations, 1 restart                       (scc.attacks.apgd)
    apgd-dlr  APGD on DLR, 100 iterations, 1 restart                                 (needs >= 3 classes)
    apgd-t    APGD on targeted DLR, 100 iterations, 1 restart, 9 target classes     (needs >= 4 classes)
    fab-t     targeted FAB, 100 iterations, 1 restart, 9 target classes, alpha_max 0.1, eta 1.05, beta 0.9
    square    Square, 5000 queries, p_init 0.8, 1 restart, schedule not rescaled  (scc.attacks.square)
Target counts are capped at classes - 1. A component whose loss needs more classes than the model has is skipped
and named in the log. torchattacks' own `AutoAttack(version='standard')` runs APGD / APGD-T / FAB with 10
iterations and rescales Square's schedule; these are the official numbers.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import SccError
from .apgd import MIN_CLASSES, apgd, apgd_targeted
from .fab import fab_targeted
from .square import square

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
TTC_SUBSET = ("apgd-ce", "apgd-dlr")
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
NEEDS_CLASSES = {"apgd-ce": 2, "apgd-dlr": MIN_CLASSES["dlr"], "apgd-t": MIN_CLASSES["dlr-targeted"], "fab-t": 2,
                 "square": 2}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The budgets of AutoAttack's components (the official standard version's by default)."""
    apgd_steps: int = 100
    apgd_restarts: int = 1
    apgd_targets: int = 9
    fab_steps: int = 100
    fab_restarts: int = 1
    fab_targets: int = 9
    fab_alpha_max: float = 0.1
    fab_eta: float = 1.05
    fab_beta: float = 0.9
    square_queries: int = 5000
    square_p_init: float = 0.8
    square_restarts: int = 1
    square_rescale_schedule: bool = False

    def describe(self, components: tuple[str, ...]) -> dict:
        """The settings of `components`, JSON-ready (what a report records)."""
        per = {"apgd-ce": {"loss": "ce", "steps": self.apgd_steps, "restarts": self.apgd_restarts},
               "apgd-dlr": {"loss": "dlr", "steps": self.apgd_steps, "restarts": self.apgd_restarts},
               "apgd-t": {"loss": "dlr-targeted", "steps": self.apgd_steps, "restarts": self.apgd_restarts,
                          "target_classes": self.apgd_targets},
               "fab-t": {"steps": self.fab_steps, "restarts": self.fab_restarts, "target_classes": self.fab_targets,
                         "alpha_max": self.fab_alpha_max, "eta": self.fab_eta, "beta": self.fab_beta},
               "square": {"queries": self.square_queries, "p_init": self.square_p_init,
                          "restarts": self.square_restarts, "rescale_schedule": self.square_rescale_schedule,
                          "loss": "margin"}}
        return {"norm": "Linf", "sequence": list(components), "on": "images still correct after the previous "
                "components", "implementation": "scc.attacks (checked against torchattacks)",
                **{c: per[c] for c in components}}


def skipped(component: str, n_classes: int) -> str | None:
    """Why `component` cannot run on an n_classes model, or None."""
    need = NEEDS_CLASSES[component]
    return None if n_classes >= need else f"{component} needs >= {need} classes (the model has {n_classes})"


def run_component(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  settings: Settings = Settings(), seed: int = 0) -> torch.Tensor:
    """Adversarial images of one AutoAttack component on (x, y)."""
    s = settings
    if name in ("apgd-ce", "apgd-dlr"):
        return apgd(model, x, y, eps, loss=name[5:], steps=s.apgd_steps, restarts=s.apgd_restarts, seed=seed)
    if name == "apgd-t":
        return apgd_targeted(model, x, y, eps, steps=s.apgd_steps, restarts=s.apgd_restarts, targets=s.apgd_targets,
                             seed=seed)
    if name == "fab-t":
        return fab_targeted(model, x, y, eps, steps=s.fab_steps, targets=s.fab_targets, restarts=s.fab_restarts,
                            alpha_max=s.fab_alpha_max, eta=s.fab_eta, beta=s.fab_beta, seed=seed)
    if name == "square":
        return square(model, x, y, eps, queries=s.square_queries, p_init=s.square_p_init, restarts=s.square_restarts,
                      seed=seed, rescale_schedule=s.square_rescale_schedule)
    raise SccError(f"unknown AutoAttack component {name!r}; choose from {', '.join(COMPONENTS)}")


def run_sequence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                 components: tuple[str, ...] = STANDARD, settings: Settings = Settings(),
                 seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The components in order, each on the images still correct. Returns the adversarial images and a log:
    {"clean": n correct, component: n still correct after it (or the reason it was skipped), "n": batch size}."""
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        logits = model(x)
    robust = logits.argmax(1) == y
    out = x.clone()
    log: dict = {"n": len(y), "clean": int(robust.sum())}
    for name in components:
        why = skipped(name, logits.shape[1])
        if why:
            log[name] = why
            continue
        idx = robust.nonzero().flatten()
        if len(idx):
            adv = run_component(name, model, x[idx], y[idx], eps, settings, seed)
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[idx]
            robust[idx[fooled]] = False
            out[idx[fooled]] = adv[fooled]
        log[name] = int(robust.sum())
    return out, log

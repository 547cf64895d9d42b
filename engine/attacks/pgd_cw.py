"""The TTC evaluation attacks (spec section 1.4), run against the *undefended* classifier (non-adaptive).

PGD: l_inf, uniform random start in [-eps, eps] clipped to [0,1], `steps` sign-gradient ascent steps of size
`alpha` (default eps) on the cross-entropy of the logits on the ground truth, summed over the batch.
CW:  the same loop on the margin loss -sum relu(z_y - max_{j != y} z_j + kappa), kappa = 50 (logit units).
Both run scc.attacks.adaptive.sign_pgd, the one PGD loop, with their own objective and step size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adaptive import Objective, ce_objective, sign_pgd


def margin_objective(model: nn.Module, y: torch.Tensor, kappa: float) -> Objective:
    """CW's per-image loss -relu(z_y - max_{j != y} z_j + kappa) on model's logits."""
    def objective(xa):
        logits = model(xa)
        z_y = logits.gather(1, y[:, None])[:, 0]
        z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return -F.relu(z_y - z_other + kappa), logits
    return objective


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str = "pgd", eps: float = 1 / 255,
           alpha: float | None = None, steps: int = 10, kappa: float = 50.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial images x + delta (same shape as x) for `name` in {'pgd', 'cw'}; alpha None is a step of eps."""
    if name not in ("pgd", "cw"):
        raise ValueError(f"unknown attack {name!r}; choose pgd or cw")
    objective = ce_objective(model, y) if name == "pgd" else margin_objective(model, y, kappa)
    adv, _ = sign_pgd(objective, x, y, eps, steps, eps if alpha is None else alpha, generator)
    return adv


def pgd(model, x, y, eps=1 / 255, alpha=None, steps=10, generator=None):
    return attack(model, x, y, "pgd", eps, alpha, steps, generator=generator)


def cw(model, x, y, eps=1 / 255, alpha=None, steps=10, kappa=50.0, generator=None):
    return attack(model, x, y, "cw", eps, alpha, steps, kappa, generator=generator)

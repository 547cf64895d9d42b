"""The TTC evaluation attacks (spec section 1.4), run against the *undefended* classifier (non-adaptive).

PGD: l_inf, uniform random start in [-eps, eps] clipped to [0,1], `steps` sign-gradient ascent steps of size
`alpha` on the cross-entropy of the logits with reduction='sum' on the ground truth.
CW:  the same loop on the margin loss -sum relu(z_y - max_{j != y} z_j + kappa), kappa = 50 (logit units).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..perturbation import project, sign_step


def _loss(name: str, logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    if name == "pgd":
        return F.cross_entropy(logits, y, reduction="sum")
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -F.relu(z_y - z_other + kappa).sum()


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str = "pgd", eps: float = 1 / 255,
           alpha: float | None = None, steps: int = 10, kappa: float = 50.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial images x + delta (same shape as x) for `name` in {'pgd', 'cw'}."""
    if name not in ("pgd", "cw"):
        raise ValueError(f"unknown attack {name!r}; choose pgd or cw")
    alpha = eps if alpha is None else alpha
    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    delta = project(eps * start, x, eps)
    grad_fn = torch.func.grad(lambda d: _loss(name, model(x + d), y, kappa))
    with torch.enable_grad():
        for _ in range(steps):
            delta = sign_step(delta, grad_fn(delta), x, alpha, eps)
    return (x + delta).detach()


def pgd(model, x, y, eps=1 / 255, alpha=None, steps=10, generator=None):
    return attack(model, x, y, "pgd", eps, alpha, steps, generator=generator)


def cw(model, x, y, eps=1 / 255, alpha=None, steps=10, kappa=50.0, generator=None):
    return attack(model, x, y, "cw", eps, alpha, steps, kappa, generator=generator)

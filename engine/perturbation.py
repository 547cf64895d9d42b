"""The l_inf perturbation step every defense and attack takes: project onto the eps ball and the [0,1] box, and
the projected sign-gradient step.

    delta = project(eps * start, x, eps)                   # Pi: |delta| <= eps and x + delta in [0, 1]
    delta = sign_step(delta, grad, x, alpha, eps)          # Pi(delta + alpha * sign(grad))
"""
from __future__ import annotations

import torch


def project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Pi: the l_inf ball of radius eps around 0, then the [0,1] box: delta in [-x, 1-x]."""
    return torch.minimum(torch.maximum(delta.clamp(-eps, eps), -x), 1 - x)


def clip_image(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The same projection in image space, for attacks that keep the adversarial image z itself:
    min(max(z, x - eps), x + eps) clamped to [0, 1] (the attack libraries' formula, to their rounding)."""
    return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0.0, 1.0)


def sign_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float,
              kernels: dict | None = None) -> torch.Tensor:
    """delta <- Pi(delta + alpha * sign(grad)): one projected sign-gradient ascent step. A NaN gradient entry
    (a degenerate input) takes no step instead of turning the perturbation into NaN.

    `kernels` (the classifier's `clf.kernels`) may hold a "sign_step" launcher from scc.kernels, which computes
    the same step in one pass (and falls back to this reference where its kernel cannot run)."""
    kernel = (kernels or {}).get("sign_step")
    if kernel is not None:
        return kernel(delta, grad, x, alpha, eps)
    return project(delta + alpha * grad.sign().nan_to_num(0.0), x, eps)

"""TTC: Test-time Counterattacks (Xing et al., CVPR 2025), the official procedure (spec sections 1.2-1.3).

    e0    = f(x)                                         reference: the input's own raw embedding (no grad)
    d0    = Pi(eps * u),  u ~ U(-1, 1)                     random start, clipped to the [0,1] box
    for k = 1..K:
        e   = f(x + d_{k-1})                               tau = ||e - e0|| / ||e0|| on the first step
        d_k = Pi(d_{k-1} + alpha * sign(grad_d ||e - e0||^2))
    Delta = sum_k softmax(beta * k) d_k   if tau < tau_thres   else   d0          (per sample)
    logits = s * cos(f(x + Delta), T)

The random start `u` is an input (shape of x, uniform in [-1, 1]) so other backends can replay it.

A fine-tuned classifier (TeCoA, FARE, ...) that carries `tau_reference`, the original model it was tuned from,
takes tau from that frozen original instead, ||f_0(x + d0) - f_0(x)|| / ||f_0(x)|| (2 extra forwards), while the
counterattack and the prediction use the tuned model: TTC's `compute_tau` for fine-tuned victims.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..draws import Draw, like_image
from ..errors import SccError
from ..grad import input_grad
from ..models import ZeroShotClassifier
from ..perturbation import project, sign_step


@dataclass(frozen=True)
class TTCConfig:
    eps: float = 4 / 255  # counterattack radius, l_inf, pixel units
    alpha: float = 1 / 255  # step size
    steps: int = 2  # K
    tau_thres: float = 0.2  # counterattack only inputs with tau < tau_thres ("falsely stable")
    beta: float = 2.0  # weights of the iterates: softmax(beta * k), k = 0..K

    def __post_init__(self):
        if self.steps < 1:
            raise SccError(f"TTC needs at least one counterattack step (tau comes from step 1), got steps={self.steps}")
        if not 0 < self.eps <= 1 or self.alpha <= 0:
            raise SccError(f"need 0 < eps <= 1 and alpha > 0, got eps={self.eps}, alpha={self.alpha}")


TTC_DRAWS = {"start": Draw("uniform", -1.0, 1.0, like_image)}  # the random start u ~ U(-1, 1), (B, 3, H, W)


def counterattack(clf: ZeroShotClassifier, x: torch.Tensor, cfg: TTCConfig, start: torch.Tensor,
                  trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TTC's perturbation Delta (B, 3, H, W) and its tau (B,). `trace` collects each step's gradient sign."""
    with torch.no_grad():
        e0 = clf.embed(x)  # (B, D)

    def deviation(d):  # squared L2 of raw embeddings, summed over the batch (per-sample gradients)
        e = clf.embed(x + d)
        return ((e - e0) ** 2).sum(), e

    grad_fn = input_grad(deviation, has_aux=True)
    d = project(cfg.eps * start, x, cfg.eps)
    iterates = [d]
    tau = None
    reference = getattr(clf, "tau_reference", None)  # the frozen original of a fine-tuned model, or None
    if reference is not None:
        with torch.no_grad():
            r0 = reference.embed(x)
            tau = (reference.embed(x + d) - r0).norm(dim=-1) / r0.norm(dim=-1)
    for k in range(cfg.steps):
        g, e = grad_fn(d)
        if k == 0 and reference is None:
            tau = (e - e0).norm(dim=-1) / e0.norm(dim=-1)
        if trace is not None:
            trace.append(g.sign())
        d = sign_step(d, g, x, cfg.alpha, cfg.eps, clf.kernels)
        iterates.append(d)
    w = torch.softmax(cfg.beta * torch.arange(cfg.steps + 1, dtype=x.dtype, device=x.device), 0)  # (K+1,)
    weighted = (w.view(-1, 1, 1, 1, 1) * torch.stack(iterates)).sum(0)  # (K+1, B, 3, H, W) -> (B, 3, H, W)
    attacked = (tau < cfg.tau_thres).view(-1, 1, 1, 1)
    return torch.where(attacked, weighted, iterates[0]), tau


def ttc(clf: ZeroShotClassifier, x: torch.Tensor, cfg: TTCConfig, start: torch.Tensor,
        trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """Logits (B, C) of x + Delta; `record`, a dict, receives the perturbation Delta (B, 3, H, W)."""
    delta, _ = counterattack(clf, x, cfg, start, trace)
    if record is not None:
        record["perturbation"] = delta
    return clf.logits_from_embedding(clf.embed(x + delta))

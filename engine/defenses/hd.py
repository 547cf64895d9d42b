"""HD, Hedge Defense (Wu et al. 2021, "Attacking Adversarial Attacks as A Defense").

    x_0 = x + eps * u,  u ~ U(-1, 1)                       random start (not clamped: as the official code)
    for t = 0..T-2:
        L_t     = KL(U || softmax(f(x_t))) = -log C - (1/C) sum_k log softmax_k(f(x_t))   (all classes at once)
        x_{t+1} = clip(x + clip(x_t + alpha * sign(grad L_t) - x, -eps, eps), 0, 1)        signed *ascent*
    logits = (1 / (T-1)) sum_{t=1..T-1} f(x_t)                                             iterate 0 excluded

Checked in the official code (burcywu/hedge_defense @6524faa, hedge_defense.py): the uniform start in the eps
ball without a [0,1] clamp, F.kl_div(log_softmax(logits), uniform, 'batchmean') maximised with sign steps of
step_size, the projection onto the eps ball then [0,1], and the prediction `sum_pred` = the logits summed over
the iterates k = 1..T-1 (the loop's first forward, on the random start, is not summed, and the example after the
last step is never evaluated); defaults epsilon 0.031, step_size 0.007, attack_steps 20.

Presets: `paper` (alias `original`; eps 8/255, alpha 0.007, T = 20: the paper's CIFAR setting) and `ttc-budget`
(eps 4/255, alpha 1/255, T = 2: TTC's budget; one gradient step, the prediction is f(x_1)).

Deviations: the logits are averaged instead of summed (the same argmax; a cross-entropy on the output keeps the
logits' scale), the KL is summed over the batch (per-image gradients; the official 'batchmean' divides every
image's gradient by B, which sign() ignores), and the last step's backward pass, whose result the official loop
computes and discards, is skipped. Cost per image: T forwards, T - 1 backwards, T rounds.
`record["perturbation"]` = x_{T-1} - x, the last iterate the prediction uses (for BPDA: with T = 2 it is the
defense's whole perturbation; with T > 2 the prediction averages T - 1 iterates and BPDA approximates it by the last).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..draws import Draw, like_image
from ..errors import SccError
from ..grad import input_grad
from ..models import ZeroShotClassifier
from ..perturbation import sign_step


@dataclass(frozen=True)
class HDConfig:
    eps: float = 8 / 255  # l_inf radius of the hedge perturbation
    alpha: float = 0.007  # step size  [official step_size]
    steps: int = 20  # T: forwards of the official loop (attack_steps)

    def __post_init__(self):
        if self.steps < 2:
            raise SccError(f"HD needs steps >= 2 (the prediction sums iterates 1..T-1), got steps={self.steps}")
        if not 0 < self.eps <= 1 or self.alpha <= 0:
            raise SccError(f"need 0 < eps <= 1 and alpha > 0, got eps={self.eps}, alpha={self.alpha}")


HD_DRAWS = {"start": Draw("uniform", -1.0, 1.0, like_image)}  # u ~ U(-1, 1), (B, 3, H, W)


def hedge_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform || softmax(logits)) summed over the batch."""
    C = logits.shape[-1]
    return (-math.log(C) - torch.log_softmax(logits, -1).mean(-1)).sum()


def hd(clf: ZeroShotClassifier, x: torch.Tensor, cfg: HDConfig, start: torch.Tensor, trace: list | None = None,
       record: dict | None = None) -> torch.Tensor:
    """Logits (B, C): the mean of f(x_t) over t = 1..T-1. `trace` collects each step's gradient sign."""
    def loss(d):
        logits = clf.logits_from_embedding(clf.embed(x + d))
        return hedge_loss(logits), logits

    grad_fn = input_grad(loss, has_aux=True)
    d = cfg.eps * start  # the official start: inside the eps ball, not clamped to [0, 1]
    total = None
    for t in range(cfg.steps - 1):
        g, logits = grad_fn(d)
        if t > 0:
            total = logits if total is None else total + logits
        if trace is not None:
            trace.append(g.sign())
        d = sign_step(d, g, x, cfg.alpha, cfg.eps, clf.kernels)
    if record is not None:
        record["perturbation"] = d
    last = clf.logits_from_embedding(clf.embed(x + d))  # x_{T-1}: evaluated, no backward
    total = last if total is None else total + last
    return total / (cfg.steps - 1)

"""White-box attacks that see the defense (the adaptive protocol's building blocks, scc.eval.adaptive runs them).

    known = KnownDraws(defended, x0, keys, eps)          # the defense with each image's draws fixed, any sub-batch
    adv, info = sign_pgd(ce_objective(known, y), x0, y, eps, 50, madry_step(eps, 50), keep_best=True)
    adv, _ = sign_pgd(eot_objective(defended, y, k=8, draws_for=...), x0, y, eps, 20, madry_step(eps, 20))  # EOT
    adv, _ = sign_pgd(bpda_objective(defended, y, known.draws), x0, y, eps, 50, madry_step(eps, 50))        # BPDA

sign_pgd is the one PGD loop of scc.attacks (the paper protocol's PGD and CW run it too); every caller passes
its step size. The random start is uniform in the eps ball.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SccError
from ..perturbation import project, sign_step


class KnownDraws(nn.Module):
    """The defended module with the draws of a batch of clean images x0 (B, 3, H, W) with `keys` fixed: every call
    on adversarial images (any subset, any order, each within eps of one x0 row) uses that row's draws.

    Rows are matched by L_inf distance: a row belongs to the clean image within eps + 1e-6 of it; none or several
    such images is an error (SccError) rather than a silent wrong guess. match="nearest" is for attacks whose
    iterates leave the eps ball (FAB searches for the closest boundary point at any distance): a row belongs to
    its nearest clean image, and a tie is the error. `calls` counts forward calls."""

    def __init__(self, defended: nn.Module, x0: torch.Tensor, keys: Sequence[Hashable], eps: float,
                 draws: dict[str, torch.Tensor] | None = None, match: str = "ball"):
        super().__init__()
        if match not in ("ball", "nearest"):
            raise SccError(f"KnownDraws match={match!r}; choose ball or nearest")
        self.defended = defended
        self.x0 = x0.detach()
        self.keys = list(keys)
        self.eps = float(eps)
        self.match = match
        self.draws = defended.draws(x0, self.keys) if draws is None else draws
        self.calls = 0
        self.last_rows: torch.Tensor | None = None

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """Index (n,) into x0 of each row of x (n, 3, H, W)."""
        a, b = x.detach().flatten(1), self.x0.flatten(1)
        dist = torch.stack([(row[None] - b).abs().amax(1) for row in a]) if len(a) else a.new_zeros((0, len(b)))
        nearest = self.match == "nearest"
        hit = dist == dist.amin(1, keepdim=True) if nearest else dist <= self.eps + 1e-6
        count = hit.sum(1)
        if bool((count != 1).any()):
            bad = (count != 1).nonzero().flatten().tolist()[:5]
            why = ("are equally near to several clean images" if nearest else
                   f"are within eps={self.eps:.5f} of {count[bad].tolist()} clean images (need exactly one)")
            raise SccError(f"KnownDraws: rows {bad} {why}: cannot tell which image's draws to use")
        return hit.float().argmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows_of(x)
        self.calls += 1
        self.last_rows = rows
        return self.defended(x, draws={k: v[rows] for k, v in self.draws.items()})


Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def madry_step(eps: float, steps: int) -> float:
    """The PGD step size of Madry et al., 2.5 eps / steps: the adaptive suite's step for every PGD it runs."""
    return 2.5 * eps / steps


def sign_pgd(objective: Objective, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float,
             generator: torch.Generator | None = None, keep_best: bool = False,
             checkpoints: Sequence[int] = ()) -> tuple[torch.Tensor, dict]:
    """L_inf PGD with a uniform random start: delta <- Pi(delta + alpha sign(grad sum_b loss_b)).

    The start is uniform in [-eps, eps] (projected into the [0,1] box), drawn from `generator`. objective(x_adv)
    -> (per-image loss (B,), logits (B, C) of the attacker's view or None); the gradient is the autograd gradient
    of the summed loss. keep_best: per image, return the iterate that fooled the attacker's view (first such),
    else the one with the highest loss; `info["fooled_at"]` then holds, per checkpoint k, the images fooled
    within the first k evaluated iterates, and `info["deltas"]` the kept delta at k. Without keep_best the final
    iterate is returned."""
    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    delta = project(eps * start, x, eps)
    best, best_score = delta.clone(), torch.full((x.shape[0],), -math.inf, device=x.device, dtype=torch.float64)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    info: dict = {"fooled_at": {}, "deltas": {}}

    def track(d, loss, logits, k):
        nonlocal best, best_score, fooled
        if not keep_best or logits is None:
            return
        wrong = logits.argmax(1) != y
        score = loss.detach().double() + 1e6 * wrong.double()
        better = (score > best_score) & ~fooled  # a fooled image keeps its first fooling iterate
        best = torch.where(better.view(-1, 1, 1, 1), d.detach(), best)
        best_score = torch.where(better, score, best_score)
        fooled = fooled | wrong
        if k in checkpoints:
            info["fooled_at"][k] = fooled.clone()
            info["deltas"][k] = best.clone()

    for k in range(steps):
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, logits = objective(x + d)
            grad, = torch.autograd.grad(loss.sum(), d)
        track(d, loss, logits, k)
        delta = sign_step(delta.detach(), grad, x, alpha, eps)
    if keep_best:
        with torch.no_grad():
            loss, logits = objective(x + delta)
        track(delta, loss, logits, steps)
        return (x + best).detach(), info
    return (x + delta).detach(), info


def ce_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    def objective(xa):
        logits = model(xa)
        return F.cross_entropy(logits, y, reduction="none"), logits
    return objective


def eot_objective(defended: nn.Module, y: torch.Tensor, k: int,
                  draws_for: Callable[[torch.Tensor], dict]) -> Objective:
    """Mean cross-entropy over k draws per image: the k copies go through the defense in one batch (B*k rows,
    copy-major); draws_for(x_rep) gives that batch's draws (fresh random draws for an attacker who does not
    know them). With k = 1 and the known draws this is the exact objective."""
    def objective(xa):
        B = xa.shape[0]
        rep = xa.repeat(k, 1, 1, 1)
        logits = defended(rep, draws=draws_for(rep))
        loss = F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, B).mean(0)
        return loss, (logits if k == 1 else None)
    return objective


def bpda_objective(defended: nn.Module, y: torch.Tensor, draws: dict | None, keys: Sequence[Hashable] | None = None,
                   clamp_grad: bool = True) -> Objective:
    """BPDA with the corrective perturbation Delta(x) held constant: logits = classifier(x + stopgrad(Delta(x))).

    clamp_grad=True keeps the derivative of the [0,1] box clamp: d(x + Delta)/dx = 0 where x + Delta sits on
    the box boundary (the defense's projection pinned it there), 1 elsewhere. clamp_grad=False is identity BPDA
    (the gradient passes everywhere), which under-reports what exact gradients find."""
    def objective(xa):
        with torch.no_grad():
            pert = defended.perturbation(xa.detach(), draws=draws, keys=keys)
        z = (xa.detach() + pert).clamp(0, 1)
        free = ((z > 0) & (z < 1)).to(xa.dtype) if clamp_grad else torch.ones_like(z)
        logits = defended.classifier(z + (xa - xa.detach()) * free)
        return F.cross_entropy(logits, y, reduction="none"), logits
    return objective

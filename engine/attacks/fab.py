"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020) of AutoAttack, L_inf: it looks for
the adversarial image *closest* to x and counts it when that distance is <= eps.

    adv = fab_targeted(model, x, y, eps=4/255, steps=100, targets=9, seed=0)

For a target t (the k-th largest clean logit, k = 2 .. targets + 1) and each image still correct, from x^(0) = x
(a restart r > 0 starts at x + min(best, eps) / 2 * u / ||u||_inf, u ~ U(-1, 1)^d):

    f(z) = z_t - z_y,  g = grad f(x^(i))                                  the linearised decision boundary
    pi_S(p) = p + d,  d = argmin ||d||_inf  s.t.  <g, p + d> = <g, x^(i)> - f(x^(i)),  p + d in [0,1]^d
              (where the plane is out of the box's reach: the box corner that gets closest to it)
    d1 = pi_S(x^(i)) - x^(i),  d2 = pi_S(x) - x
    alpha = min(||d1||_inf / (||d1||_inf + ||d2||_inf), alpha_max)        (norms floored at 1e-8)
    x^(i+1) = clip_[0,1]((1 - alpha)(x^(i) + eta d1) + alpha (x + eta d2))
    if x^(i+1) is misclassified: keep it when closer than the best so far, then
        x^(i+1) = x + beta (x^(i+1) - x)                                  step back towards x

Defaults (AutoAttack's): steps 100, alpha_max 0.1, eta 1.05, beta 0.9, one restart, 9 targets. An image counts as
broken only if the closest adversarial image found is within eps; otherwise the clean image is returned.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SccError


def project_linf_plane(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The L_inf-smallest move d (n, D) that takes each point p (n, D) in [0,1]^D onto the plane <w, p + d> = b
    while staying in the box; where the box cannot reach the plane, the move to the box corner closest to it.

    With c = <w, p> - b >= 0 (flip w, b otherwise), coordinate i moves by -sign(w_i) min(lambda, r_i), where its
    room r_i is p_i (w_i > 0, moving down) or 1 - p_i (w_i < 0, moving up). The decrease
    D(lambda) = sum_i |w_i| min(lambda, r_i) is piecewise linear in lambda with breakpoints at the sorted rooms,
    so lambda solves D = c on the first segment whose end reaches c."""
    c = (w * p).sum(1) - b
    flip = torch.where(c >= 0, 1.0, -1.0).to(w.dtype)
    w, c = w * flip[:, None], c * flip
    up = w < 0
    room = torch.where(up, 1 - p, p)
    aw = w.abs()
    rooms, order = room.sort(dim=1)
    a_sorted = aw.gather(1, order)
    cum_a, cum_ar = a_sorted.cumsum(1), (a_sorted * rooms).cumsum(1)
    total = cum_a[:, -1:]
    reach = cum_ar + rooms * (total - cum_a)  # D at each breakpoint, non-decreasing
    k = torch.searchsorted(reach, c[:, None].contiguous()).clamp(max=p.shape[1] - 1)  # first breakpoint >= c
    prev_ar = torch.where(k > 0, cum_ar.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(c[:, None]))
    prev_a = torch.where(k > 0, cum_a.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(c[:, None]))
    lam = ((c[:, None] - prev_ar) / (total - prev_a).clamp_min(1e-30)).clamp_min(0)
    feasible = (reach[:, -1:] >= c[:, None])
    lam = torch.where(feasible, lam, torch.full_like(lam, float("inf")))  # unreachable: all the way to the corner
    d = torch.minimum(lam, room) * torch.where(up, 1.0, -1.0)
    return d * (w != 0)


def fab_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target_rank: int, eps: float, steps: int,
            alpha_max: float, eta: float, beta: float, random_start: bool, gen: torch.Generator) -> torch.Tensor:
    """One targeted FAB run on the images x (B, ...) towards the `target_rank`-th largest clean logit: the
    closest adversarial image found per correctly classified image, else x."""
    with torch.no_grad():
        logits = model(x)
    correct = (logits.argmax(1) == y).nonzero().flatten()
    out = x.clone()
    if not len(correct):
        return out
    x0, la = x[correct], y[correct]
    lt = logits.sort(dim=-1)[1][:, -target_rank][correct]
    B = len(correct)
    view = (-1,) + (1,) * (x.dim() - 1)
    rows = torch.arange(B, device=x.device)
    best, best_dist = x0.clone(), torch.full((B,), 1e10, device=x.device)
    x1 = x0.clone()
    if random_start:
        u = (2 * torch.rand(x1.shape, generator=gen) - 1).to(x.device)
        radius = torch.minimum(best_dist, torch.full_like(best_dist, eps)).view(view)
        x1 = (x0 + radius * u / u.flatten(1).abs().amax(1).view(view) * 0.5).clamp(0.0, 1.0)
    flat0 = x0.flatten(1)
    for _ in range(steps):
        xg = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xg)
            f = z[rows, lt] - z[rows, la]
            g, = torch.autograd.grad(f.sum(), xg)
        with torch.no_grad():
            w = g.flatten(1)
            b = -f.detach() + (w * x1.flatten(1)).sum(1)
            d = project_linf_plane(torch.cat((x1.flatten(1), flat0)), torch.cat((w, w)), torch.cat((b, b)))
            norm = d.abs().amax(1).clamp_min(1e-8)
            alpha = (norm[:B] / (norm[:B] + norm[B:])).clamp(0.0, alpha_max).view(view)
            d1, d2 = d[:B].view_as(x1), d[B:].view_as(x1)
            x1 = ((x1 + eta * d1) * (1 - alpha) + (x0 + d2 * eta) * alpha).clamp(0.0, 1.0)
            wrong = model(x1).argmax(1) != la
            if bool(wrong.any()):
                dist = (x1 - x0).flatten(1).abs().amax(1)
                closer = wrong & (dist < best_dist)
                best[closer], best_dist[closer] = x1[closer], dist[closer]
                x1[wrong] = x0[wrong] + (x1[wrong] - x0[wrong]) * beta
    found = best_dist < 1e10
    out[correct[found]] = best[found]
    return out


def fab_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
                 targets: int = 9, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 seed: int = 0) -> torch.Tensor:
    """L_inf FAB-T adversarial images for (x, y): for each target (capped at classes - 1) and restart, the images
    still correct are attacked; an image is broken when the closest adversarial image is within eps."""
    if x.dim() != 4 or y.shape != x.shape[:1]:
        raise SccError(f"FAB needs images (B, 3, H, W) and labels (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if steps < 1 or restarts < 1 or targets < 1:
        raise SccError(f"FAB needs steps, restarts and targets >= 1, got {steps}, {restarts}, {targets}")
    gen = torch.Generator().manual_seed(int(seed))
    x, y = x.detach(), y.detach()
    out = x.clone()
    with torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    for rank in range(2, min(targets, logits.shape[1] - 1) + 2):
        for r in range(restarts):
            idx = correct.nonzero().flatten()
            if not len(idx):
                return out
            adv = fab_run(model, x[idx], y[idx], rank, eps, steps, alpha_max, eta, beta, r > 0, gen)
            with torch.no_grad():
                broken = (model(adv).argmax(1) != y[idx]) & ((adv - x[idx]).flatten(1).abs().amax(1) <= eps)
            correct[idx[broken]] = False
            out[idx[broken]] = adv[broken]
    return out

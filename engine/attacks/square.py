"""Square (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): the score-based black-box attack of AutoAttack,
L_inf, margin loss. It only reads the model's logits, so it checks whether a defense merely masks gradients.

    adv = square(model, x, y, eps=4/255, queries=5000, p_init=0.8, rescale_schedule=False, seed=0)   # AutoAttack's

One run on images x (B, c, h, w) with labels y, margin m(x) = z_y - max_{j != y} z_j (fooled when m <= 0):

    x_best = clip(x + eps * s),  s in {-1, +1}^(c x 1 x w)        vertical stripes: one sign per channel and column
    repeat `queries` times on the images with m > 0:
        p = p_init halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
            (rescale_schedule: the iteration is first mapped to it * 10000 / queries)
        side = min(max(round(sqrt(p * h * w)), 1), h, w); a random side x side window (one position for the batch)
        x_new = P(x_best + window * 2 eps * r),  r in {-1, +1}^(c x 1 x 1)    P: eps ball around x and [0,1]
        keep x_new where its margin is lower, or where it fools the model

`restarts` runs restart on the images still correct. As in the official code the window, its position and its
signs are shared by the batch, and the random numbers come from one CPU generator seeded with `seed`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import SccError
from ..perturbation import clip_image

# iteration thresholds of the p schedule: p = p_init / 2**j after the j-th
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(it: int, p_init: float, queries: int, rescale_schedule: bool) -> float:
    """The fraction of pixels the square covers at iteration `it`."""
    if rescale_schedule:
        it = int(it / queries * 10000)
    return p_init / 2 ** sum(it > t for t in P_SCHEDULE)


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per image (B,)."""
    logits = model(x)
    z_y = logits.gather(1, y[:, None])[:, 0]
    return z_y - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def _signs(shape, gen, device) -> torch.Tensor:
    return torch.sign(2 * torch.rand(shape, generator=gen) - 1).to(device)


def _randint(low: int, high: int, gen) -> int:
    return int((low + (high - low) * torch.rand([1], generator=gen)).long())


def square_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, p_init: float,
               rescale_schedule: bool, gen: torch.Generator) -> torch.Tensor:
    """One Square run (see the module docstring): the best images found (B, c, h, w)."""
    c, h, w = x.shape[1:]
    x_best = (x + eps * _signs([x.shape[0], c, 1, w], gen, x.device)).clamp(0.0, 1.0)
    m_best = margin(model, x_best, y)
    loss_best = m_best.clone()
    if bool((m_best < 0).all()):
        return x_best
    for it in range(queries):
        idx = (m_best > 0).nonzero().flatten()
        x_cur, xb, y_cur = x[idx], x_best[idx], y[idx]
        side = max(int(round(math.sqrt(p_selection(it, p_init, queries, rescale_schedule) * h * w))), 1)
        side = min(side, h, w)
        vh, vw = _randint(0, h - side, gen), _randint(0, w - side, gen)
        window = torch.zeros(c, h, w, device=x.device)
        window[:, vh:vh + side, vw:vw + side] = 2.0 * eps * _signs([c, 1, 1], gen, x.device)
        x_new = clip_image(xb + window, x_cur, eps)
        m_new = margin(model, x_new, y_cur)
        improved = m_new < loss_best[idx]
        loss_best[idx] = torch.where(improved, m_new, loss_best[idx])
        improved |= m_new <= 0
        m_best[idx] = torch.where(improved, m_new, m_best[idx])
        x_best[idx] = torch.where(improved.view(-1, 1, 1, 1), x_new, xb)
        if bool((m_best <= 0).all()):
            break
    return x_best


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int = 1000,
           p_init: float = 0.8, restarts: int = 1, seed: int = 0, rescale_schedule: bool = True) -> torch.Tensor:
    """L_inf Square adversarial images for (x, y) after at most `queries` model calls per image and restart;
    images it does not fool are returned unchanged. AutoAttack's standard version: queries=5000, p_init=0.8,
    rescale_schedule=False."""
    if x.dim() != 4 or y.shape != x.shape[:1]:
        raise SccError(f"Square needs images (B, 3, H, W) and labels (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if queries < 1 or restarts < 1 or not 0 < p_init <= 1:
        raise SccError(f"Square needs queries >= 1, restarts >= 1 and 0 < p_init <= 1, got {queries}, {restarts}, "
                       f"{p_init}")
    gen = torch.Generator().manual_seed(int(seed))
    x, y = x.detach(), y.detach()
    out = x.clone()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        for _ in range(restarts):
            idx = correct.nonzero().flatten()
            if not len(idx):
                break
            adv = square_run(model, x[idx], y[idx], eps, queries, p_init, rescale_schedule, gen)
            fooled = model(adv).argmax(1) != y[idx]
            correct[idx[fooled]] = False
            out[idx[fooled]] = adv[fooled]
    return out

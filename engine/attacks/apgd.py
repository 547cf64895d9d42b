"""APGD, the step-size-free PGD of AutoAttack (Croce & Hein, ICML 2020), L_inf, on a model's logits.

    adv = apgd(model, x, y, eps=4/255, loss="ce", steps=100, restarts=1, seed=0)     # APGD-CE; loss="dlr": APGD-DLR
    adv = apgd_targeted(model, x, y, eps=4/255, steps=100, targets=9, seed=0)         # APGD-T (targeted DLR)

One run (`apgd_run`), N_iter = steps, on images x (B, 3, H, W) with labels y (B,):

    x^(0) = P(x + eps * u / ||u||_inf),  u ~ U(-1, 1)^d              P = clip to the eps ball around x and to [0,1]
    eta_0 = 2 eps (per image)
    z^(k+1) = P(x^(k) + eta sign(grad L(x^(k))))
    x^(k+1) = P(x^(k) + a (z^(k+1) - x^(k)) + (1 - a)(x^(k) - x^(k-1))),   a = 1 at k = 0, else 0.75 (momentum)

Checkpoints: the first after w_1 = max(int(0.22 N), 1) iterations, then every w_j = max(w_{j-1} - max(int(0.03 N),
1), max(int(0.06 N), 1)) more (N = 100: after iterations 22, 41, 57, 70, 80, 87, 93, 99). At a checkpoint an
image halves its step size, and restarts from its best point x_max (highest loss so far, with its gradient),
when (1) the loss rose in at most rho = 0.75 of the last w_j iterations, or (2) its step size was not halved at the
previous checkpoint and its best loss has not improved since. As in the official code (fra31/auto-attack), the
comparison before the first iterate is made against 0 (its loss buffer's unset last row), not the start's loss.

Losses (per image; the gradient is that of their sum):
    CE            cross_entropy(z, y)
    DLR           -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)              (pi: logits sorted descending)
    targeted DLR  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

`apgd` runs `restarts` runs on the images still classified correctly (clean images that are already wrong are not
attacked); `apgd_targeted` does that for each target t = the k-th largest clean logit, k = 2 .. targets + 1. Each
image returns the last iterate that fooled the model (else the clean image). Random numbers come from one CPU
generator seeded with `seed` and are drawn in the official order, so a deterministic model gets the official
code's (and torchattacks') adversarial images up to floating-point rounding.

The model is only ever called on sub-batches of x (the images still correct), so a defense with per-image draws
must map rows back to images (scc.attacks.adaptive.KnownDraws does).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SccError
from ..perturbation import clip_image

LOSSES = ("ce", "dlr", "dlr-targeted")
MIN_CLASSES = {"ce": 2, "dlr": 3, "dlr-targeted": 4}


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), per image (B,)."""
    z_sorted, order = logits.sort(dim=1)
    top_is_y = (order[:, -1] == y).float()
    z_y = logits.gather(1, y[:, None])[:, 0]
    runner_up = z_sorted[:, -2] * top_is_y + z_sorted[:, -1] * (1.0 - top_is_y)
    return -(z_y - runner_up) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), per image (B,)."""
    z_sorted, _ = logits.sort(dim=1)
    z_y, z_t = logits.gather(1, y[:, None])[:, 0], logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def schedule(steps: int) -> tuple[int, int, int]:
    """(w_1, w_min, decrement): the first checkpoint interval, its floor and its per-checkpoint decrement."""
    return max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)


def checkpoints(steps: int) -> list[int]:
    """The iterations (0-based) after which the step size is checked: [21, 40, 56, 69, 79, 86, 92, 98] for 100."""
    k, k_min, decr = schedule(steps)
    out, i = [], k - 1
    while i < steps:
        out.append(i)
        k = max(k - decr, k_min)
        i += k
    return out


@dataclasses.dataclass
class Run:
    """One APGD run: per image, whether any iterate fooled the model, the last fooling iterate (else the start),
    the highest loss and its iterate, and the step size of each image after each checkpoint (n_checks, B)."""
    fooled: torch.Tensor
    adv: torch.Tensor
    loss_best: torch.Tensor
    x_best: torch.Tensor
    step_sizes: list[torch.Tensor]


def _loss_fn(loss: str, target: torch.Tensor | None):
    if loss == "ce":
        return lambda z, y: F.cross_entropy(z, y, reduction="none")
    if loss == "dlr":
        return dlr_loss
    if loss == "dlr-targeted":
        if target is None:
            raise SccError("the targeted DLR loss needs target classes")
        return lambda z, y: dlr_targeted_loss(z, y, target)
    raise SccError(f"unknown APGD loss {loss!r}; choose from {', '.join(LOSSES)}")


def apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce", steps: int = 100,
             generator: torch.Generator | None = None, target: torch.Tensor | None = None,
             rho: float = 0.75) -> Run:
    """One APGD run from a random start (see the module docstring); `generator` is a CPU generator."""
    loss_of = _loss_fn(loss, target)
    B = x.shape[0]
    view = (-1,) + (1,) * (x.dim() - 1)

    def grad_at(xa):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xa)
            per_image = loss_of(logits, y)
            grad, = torch.autograd.grad(per_image.sum(), xa)
        return grad.detach(), logits.detach(), per_image.detach()

    u = 2 * torch.rand(x.shape, generator=generator).to(x.device) - 1
    x_adv = (x + eps * (u / (u.flatten(1).abs().amax(1).view(view) + 1e-12))).clamp(0.0, 1.0)
    grad, logits, current = grad_at(x_adv)
    fooled = logits.argmax(1) != y
    adv, x_best, grad_best, loss_best = x_adv.clone(), x_adv.clone(), grad.clone(), current.clone()
    loss_steps = torch.zeros(steps, B, device=x.device)
    step = torch.full((B,) + (1,) * (x.dim() - 1), 2.0 * eps, device=x.device)
    x_old = x_adv.clone()
    k, k_min, decr = schedule(steps)
    since_check = 0
    best_at_check, halved_at_check = loss_best.clone(), torch.ones(B, dtype=torch.bool, device=x.device)
    step_sizes = []
    for i in range(steps):
        with torch.no_grad():
            momentum, x_old = x_adv - x_old, x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            z = clip_image(x_adv + step * grad.sign(), x, eps)
            x_adv = clip_image(x_adv + (z - x_adv) * a + momentum * (1 - a), x, eps)
        grad, logits, current = grad_at(x_adv)
        wrong = logits.argmax(1) != y
        fooled |= wrong
        adv[wrong] = x_adv[wrong]
        loss_steps[i] = current
        better = current > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], current[better]
        since_check += 1
        if since_check == k:
            # loss_steps[i - k] is row -1 (still 0) at the first checkpoint, as in the official code
            rises = sum((loss_steps[i - j] > loss_steps[i - j - 1]).float() for j in range(k))
            halve = (rises <= k * rho) | (~halved_at_check & (best_at_check >= loss_best))
            halved_at_check, best_at_check = halve.clone(), loss_best.clone()
            if bool(halve.any()):
                step[halve] /= 2.0
                x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            step_sizes.append(step.flatten().clone())
            since_check = 0
            k = max(k - decr, k_min)
    return Run(fooled, adv, loss_best, x_best, step_sizes)


def _check(x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int) -> None:
    if x.dim() != 4 or y.shape != x.shape[:1]:
        raise SccError(f"APGD needs images (B, 3, H, W) and labels (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0 <= eps <= 1:
        raise SccError(f"eps must be in [0, 1] pixel units, got {eps}")
    if steps < 1 or restarts < 1:
        raise SccError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")


def _needs_classes(loss: str, n_classes: int) -> None:
    if n_classes < MIN_CLASSES[loss]:
        raise SccError(f"the {loss.upper()} loss needs >= {MIN_CLASSES[loss]} classes, the model has {n_classes}")


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce", steps: int = 100,
         restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """L_inf APGD (loss "ce" | "dlr") adversarial images for (x, y); unbroken images are returned unchanged."""
    _check(x, y, eps, steps, restarts)
    _loss_fn(loss, None)
    gen = torch.Generator().manual_seed(int(seed))
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        logits = model(x)
    _needs_classes(loss, logits.shape[1])
    correct = logits.argmax(1) == y
    out = x.clone()
    for _ in range(restarts):
        idx = correct.nonzero().flatten()
        if not len(idx):
            break
        run = apgd_run(model, x[idx], y[idx], eps, loss, steps, gen)
        hit = idx[run.fooled]
        correct[hit] = False
        out[hit] = run.adv[run.fooled]
    return out


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
                  restarts: int = 1, targets: int = 9, seed: int = 0) -> torch.Tensor:
    """L_inf APGD-T: targeted DLR runs towards the 2nd, 3rd, ... (targets + 1)-th largest clean logit, each on the
    images still correct (targets is capped at classes - 1)."""
    _check(x, y, eps, steps, restarts)
    gen = torch.Generator().manual_seed(int(seed))
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        logits = model(x)
    _needs_classes("dlr-targeted", logits.shape[1])
    correct = logits.argmax(1) == y
    out = x.clone()
    for rank in range(2, min(targets, logits.shape[1] - 1) + 2):
        for _ in range(restarts):
            idx = correct.nonzero().flatten()
            if not len(idx):
                return out
            with torch.no_grad():
                target = model(x[idx]).sort(dim=1)[1][:, -rank]
            run = apgd_run(model, x[idx], y[idx], eps, "dlr-targeted", steps, gen, target=target)
            hit = idx[run.fooled]
            correct[hit] = False
            out[hit] = run.adv[run.fooled]
    return out

"""The official TTC procedure as the reference row of `scc bench` ("ttc-official"): plain eager fp32 PyTorch in
the official code's order of passes (Sxing2/CLIP-Test-time-Counterattacks, `tau_thres_weighted_counterattacks`
and the final forward of `validate`; spec sections 1.2 and 5), written here independently of scc.defenses.ttc so
that the engine's TTC is timed and checked against something it does not share code with.

    with no_grad:  e0 = f(norm(x))                                  1 reference forward
    delta = clamp(eps * u, -x, 1 - x);  delta.requires_grad = True
    for k in 0..K-1:                                                K forwards + K input gradients
        e = f(norm(x + delta));  tau = ||e - e0|| / ||e0|| at k = 0
        g = autograd.grad(sum ||e - e0||^2, delta)
        delta = clamp(clamp(delta + alpha * sign(g), -eps, eps), -x, 1 - x)
    w = exp(sign(tau_thres - tau) * beta * k) / sum   where tau < tau_thres, else one-hot on k = 0
    with no_grad:  logits = 100 * cos(f(norm(x + sum_k w_k delta_k)), T)       1 final forward

The model is the caller's fp32 classifier as loaded (open_clip's modules, frozen weights), one pass after the
other, nothing batched, nothing compiled. `u` is TTC's random-start draw (U(-1, 1), the shape of x), so the row
replays exactly the draws the engine's TTC rows get.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import ZeroShotClassifier

LABEL = "ttc-official"


def official_ttc(clf: ZeroShotClassifier, x: torch.Tensor, start: torch.Tensor, eps: float = 4 / 255,
                 alpha: float = 1 / 255, steps: int = 2, tau_thres: float = 0.2, beta: float = 2.0) -> torch.Tensor:
    """Logits (B, C) of the official TTC procedure on pixels x (B, 3, H, W) in [0, 1] with the random start
    `start` (B, 3, H, W) in [-1, 1]."""
    encode = lambda z: clf.visual((z - clf.mean) / clf.std)  # encode_image(clip_img_preprocessing(z))
    lo, hi = -x, 1 - x
    with torch.no_grad():
        reference = encode(x)
        reference_norm = reference.norm(dim=-1)
    delta = torch.max(torch.min(eps * start, hi), lo).clone().requires_grad_(True)
    deltas = [delta.detach().clone()]
    tau = None
    with torch.enable_grad():
        for k in range(steps):
            feats = encode(x + delta)
            if k == 0:
                tau = (feats - reference).norm(dim=-1).detach() / reference_norm
            loss = ((feats - reference) ** 2).sum(1).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            d = torch.clamp(delta.detach() + alpha * torch.sign(grad), min=-eps, max=eps)
            d = torch.max(torch.min(d, hi), lo)
            delta = d.requires_grad_(True)
            deltas.append(d.detach().clone())
    scheme = (tau_thres - tau).sign()  # (B,)
    k = torch.arange(steps + 1, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)  # (B, K+1)
    weights = torch.exp(scheme.view(-1, 1) * k * beta)
    weights = weights / weights.sum(dim=1, keepdim=True)
    hard = torch.zeros_like(weights)
    hard[:, 0] = 1.0
    weights = torch.where(scheme.view(-1, 1) > 0, weights, hard).view(x.shape[0], steps + 1, 1, 1, 1)
    final_delta = (weights * torch.stack(deltas, dim=1)).sum(dim=1)  # (B, K+1, 3, H, W) -> (B, 3, H, W)
    with torch.no_grad():
        feats = encode(x + final_delta)
        return clf.logit_scale * F.normalize(feats, dim=-1) @ clf.text.t()

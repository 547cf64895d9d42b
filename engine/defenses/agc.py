"""AGC: Adaptive Geodesic Correction (lizhiwei23/AGC), a forward-only test-time defense.

    V        = [x] + N RandomPerspective(distortion 0.5, p = 1, bicubic, fill 0) views       N = 32, one forward
    b        = normalize(f(x)),  a_i = normalize(f(V_i))
    anchor   = normalize(mean_i a_i)
    attack   = clamp(mean_i (1 - <a_i, b>), 0, 1)                                          outlierness of the base
    trust    = clamp((mean_{i != j} <a_i, a_j> + 1) / 2, 0, 1)                             agreement of the views
    beta     = beta_clean + (beta_adv - beta_clean) clamp(attack^0.9 trust^1, 0, 1)
    theta    = arccos(clamp(<b, anchor>, -1 + 1e-8, 1 - 1e-8))
    u        = normalize(anchor - <b, anchor> b)                                           tangent toward the anchor
    f        = normalize(cos(beta theta) b + sin(beta theta) u)   (f = b when theta < 1e-6)  geodesic step; beta > 1
                                                                                            overshoots the anchor
    logits   = s f T^T

Checked in the official code (lizhiwei23/AGC @02bcf94): utils/tta.py (Adaptive_geo_cor: n_views 32,
beta_clean 0.45, beta_adv 2.25 passed to the correction), utils/pull_modes.py (compute_beta_from_consensus with
gamma_attack 0.9, gamma_trust 1.0; _build_anchor; _geodesic_push), data/augmentation.py (the base view and 32
RandomPerspective(0.5, p=1, BICUBIC) views, then Resize 224 + CenterCrop 224, the identity on images of the
model's size). 33 forwards, no backward, one round per image.

Views here: torchvision's RandomPerspective sampling from the `corners` draws (B, 32, 8) uniforms
(lo + floor(u (hi - lo)) for each torch.randint), the homography in closed form and PIL's transform conventions
(pixel-centre evaluation, bicubic with a = -1, black outside), on float tensors: within one 8-bit level of PIL's
8-bit output except at a few pixels on the quad's edge whose inside/outside test is a floating-point tie
(scc.defenses.augment, tested). Gradient: exact through the bicubic weights (the tap positions and the
inside/outside mask are piecewise constant). `record["perturbation"]` is zero: AGC corrects the feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..draws import Draw
from ..errors import SccError
from ..models import ZeroShotClassifier
from . import augment


@dataclass(frozen=True)
class AGCConfig:
    views: int = 32  # n_views
    distortion: float = 0.5  # RandomPerspective distortion_scale
    beta_clean: float = 0.45
    beta_adv: float = 2.25  # Adaptive_geo_cor's value (pull_modes' own default, 2.4, is overridden)
    gamma_attack: float = 0.9
    gamma_trust: float = 1.0
    eps: float = 1e-8

    def __post_init__(self):
        if self.views < 2:
            raise SccError(f"AGC needs at least 2 views (the trust score compares pairs), got views={self.views}")
        if not 0 <= self.distortion <= 1:
            raise SccError(f"distortion must be in [0, 1], got {self.distortion}")


AGC_DRAWS = {"corners": Draw("uniform", 0.0, 1.0, lambda cfg, image: (cfg.views, 8))}  # (B, N, 8)


def correction_beta(base: torch.Tensor, views: torch.Tensor, cfg: AGCConfig) -> torch.Tensor:
    """beta (B,) from the unit base feature (B, D) and unit view features (B, N, D)."""
    cos = (views * base[:, None]).sum(-1)  # (B, N)
    attack = (1 - cos).mean(1).clamp(0, 1)
    sim = views @ views.transpose(1, 2)  # (B, N, N)
    n = views.shape[1]
    off_diag = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
    trust = ((off_diag + 1) * 0.5).clamp(0, 1)
    score = (attack.pow(cfg.gamma_attack) * trust.pow(cfg.gamma_trust)).clamp(0, 1)
    return cfg.beta_clean + (cfg.beta_adv - cfg.beta_clean) * score


def geodesic_push(base: torch.Tensor, anchor: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Move the unit base (B, D) along the great circle toward the unit anchor (B, D) by beta (B,) times the
    angle between them; the base itself where that angle is below 1e-6."""
    dot = (base * anchor).sum(-1)
    theta = torch.arccos(dot.clamp(-1 + eps, 1 - eps))  # (B,)
    tangent = anchor - dot[:, None] * base
    u = tangent / tangent.norm(dim=-1, keepdim=True).clamp_min(eps)
    step = (beta * theta)[:, None]
    pushed = F.normalize(torch.cos(step) * base + torch.sin(step) * u, dim=-1)
    return torch.where((theta < 1e-6)[:, None], base, pushed)


def agc(clf: ZeroShotClassifier, x: torch.Tensor, cfg: AGCConfig, corners: torch.Tensor,
        trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """Logits (B, C) of the corrected feature. `trace` stays empty (no gradient steps)."""
    B = x.shape[0]
    views = augment.perspectives(x, corners, cfg.distortion)  # (B, N, 3, H, W)
    batch = torch.cat([x[:, None], views], 1).reshape(B * (cfg.views + 1), *x.shape[1:])
    feats = F.normalize(clf.embed(batch), dim=-1).view(B, cfg.views + 1, -1)  # one round
    base, aug = feats[:, 0], feats[:, 1:]
    anchor = F.normalize(aug.mean(1), dim=-1)
    final = geodesic_push(base, anchor, correction_beta(base, aug, cfg), cfg.eps)
    if record is not None:
        record["perturbation"] = torch.zeros_like(x)
    return clf.logit_scale * final @ clf.text.t()

"""DOC, Directional Orthogonal Counterattack (Jiang, Dong, Shi, Gui; AAAI 2026; arXiv 2511.09064).

    e0      = I(x)                                                    the input's own raw embedding
    gate    tau_hat = 1 - (1/M) sum_m cos(I(x + eta_m), e0),  eta_m = eps * u_m  (u_m ~ U(-1, 1); "sign": sign(u_m))
            w = sigmoid(gamma (tau - tau_hat))                            per image: ~1 when the input is "falsely
                                                                          stable" (adversarial), ~0 when not
    d_0     = Pi(eps * v),  v ~ U(-1, 1);   m_0 = 0
    for t = 1..T:
        g     = grad_d ||I(x + d_{t-1}) - e0||^2,   g_hat = g / ||g||    (per image, over all pixels)
        r     = r_t - <r_t, g_hat> g_hat,           r_hat = r / ||r||    r_t ~ N(0, I): a random direction
                                                                          orthogonal to the gradient
        m_t   = mu m_{t-1} + (1 - mu) (g_hat + lambda r_hat)             momentum
        d_t   = Pi(d_{t-1} + alpha sign(m_t))                            Pi: |d| <= eps and x + d in [0, 1]
    Delta  = w d_T + (1 - w) d_0
    logits = s cos(I(x + Delta), T)

From the paper (main text and Algorithm 1; the official code, listed as bookman233/DOC, could not be retrieved
here): the gate, the per-sample normalised gradient of TTC's embedding deviation, the orthogonal random
direction, the momentum and the blend of d_T with d_0; main-text defaults eps = 4/255, T = 4, alpha = 3/255.
NOT verified: lambda, mu, M, tau and gamma are given in the paper's supplement, which could not be found with the
search tools; the values here (lambda 0.05, mu 0.75, M 5, tau 0.3, gamma 20) come from a third-party
re-implementation and are unverified. The gate noise: the text writes eta = eps sign(N(0, 1)), Algorithm 1
U(-eps, eps); `gate_noise` picks ("uniform" = Algorithm 1, the default). Inferred: the [0,1] clamp in Pi (as
TTC's code does), the squared norm in the objective (its per-sample normalised gradient equals that of the
norm, and it has no singularity at d = 0), and TTC's clamped random start for d_0.

Cost per image: 1 + M forwards in one round (e0 and the gate's noisy copies), T forward+backward rounds, one
final forward: M + T + 2 forwards, T backwards, T + 2 rounds. `trace` collects sign(m_t) of every step;
`record["perturbation"]` = Delta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..draws import Draw, like_image
from ..errors import SccError
from ..grad import input_grad
from ..models import ZeroShotClassifier
from ..perturbation import project, sign_step

GATE_NOISE = ("uniform", "sign")


@dataclass(frozen=True)
class DOCConfig:
    eps: float = 4 / 255  # counterattack radius  [paper, main text]
    alpha: float = 3 / 255  # step size  [paper, main text]
    steps: int = 4  # T  [paper, main text]
    orth: float = 0.05  # lambda, weight of the orthogonal direction  [unverified]
    momentum: float = 0.75  # mu  [unverified]
    copies: int = 5  # M noisy copies of the gate  [unverified]
    tau: float = 0.3  # gate threshold  [unverified]
    gamma: float = 20.0  # gate sharpness  [unverified]
    gate_noise: str = "uniform"  # eta_m = eps * u ("uniform", Algorithm 1) or eps * sign(u) ("sign", the text)

    def __post_init__(self):
        if self.steps < 1 or self.copies < 1:
            raise SccError(f"DOC needs steps >= 1 and copies >= 1, got steps={self.steps}, copies={self.copies}")
        if not 0 < self.eps <= 1 or self.alpha <= 0:
            raise SccError(f"need 0 < eps <= 1 and alpha > 0, got eps={self.eps}, alpha={self.alpha}")
        if not 0 <= self.momentum < 1:
            raise SccError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.gate_noise not in GATE_NOISE:
            raise SccError(f"gate_noise must be one of {GATE_NOISE}, got {self.gate_noise!r}")


DOC_DRAWS = {
    "start": Draw("uniform", -1.0, 1.0, like_image),  # v: the random start d_0 = Pi(eps v), (B, 3, H, W)
    "gate": Draw("uniform", -1.0, 1.0, lambda cfg, image: (cfg.copies, *image)),  # u_m, (B, M, 3, H, W)
    "orth": Draw("normal", shape=lambda cfg, image: (cfg.steps, *image)),  # r_t ~ N(0, I), (B, T, 3, H, W)
}


def gate_weight(clf: ZeroShotClassifier, x: torch.Tensor, cfg: DOCConfig,
                gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (B,), e0 (B, D)) from one batched forward of x and its M noisy copies."""
    B, M = gate.shape[:2]
    eta = cfg.eps * (gate if cfg.gate_noise == "uniform" else torch.where(gate > 0, 1.0, -1.0).to(x.dtype))
    noisy = (x[:, None] + eta).reshape(B * M, *x.shape[1:])  # (B*M, 3, H, W), not clamped (as the paper)
    e = clf.embed(torch.cat([x, noisy]))  # (B + B*M, D): one round
    e0, en = e[:B], e[B:].view(B, M, -1)
    tau_hat = 1 - F.cosine_similarity(en, e0[:, None], dim=-1).mean(1)  # (B,)
    return torch.sigmoid(cfg.gamma * (cfg.tau - tau_hat)), e0


def per_image_unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| over all but the batch dimension (zero stays zero)."""
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


def orthogonal_unit(r: torch.Tensor, g_hat: torch.Tensor) -> torch.Tensor:
    """The component of r orthogonal to the unit vector g_hat (per image), normalised."""
    dot = (r * g_hat).flatten(1).sum(1).view(-1, *[1] * (r.dim() - 1))
    return per_image_unit(r - dot * g_hat)


def doc(clf: ZeroShotClassifier, x: torch.Tensor, cfg: DOCConfig, start: torch.Tensor, gate: torch.Tensor,
        orth: torch.Tensor, trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """Logits (B, C) of x + Delta."""
    w, e0 = gate_weight(clf, x, cfg, gate)  # w stays differentiable in x (an adaptive attack can lower it)
    e0 = e0.detach()

    def deviation(d):  # squared L2 of raw embeddings, summed over the batch (per-sample gradients)
        return ((clf.embed(x + d) - e0) ** 2).sum()

    grad_fn = input_grad(deviation)
    d0 = project(cfg.eps * start, x, cfg.eps)
    d, m = d0, torch.zeros_like(x)
    for t in range(cfg.steps):
        g_hat = per_image_unit(grad_fn(d))
        direction = g_hat + cfg.orth * orthogonal_unit(orth[:, t], g_hat)
        m = cfg.momentum * m + (1 - cfg.momentum) * direction
        if trace is not None:
            trace.append(m.sign())
        d = sign_step(d, m, x, cfg.alpha, cfg.eps, clf.kernels)
    wv = w.view(-1, 1, 1, 1)
    delta = wv * d + (1 - wv) * d0
    if record is not None:
        record["perturbation"] = delta
    return clf.logits_from_embedding(clf.embed(x + delta))

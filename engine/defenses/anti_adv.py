"""Anti-adv: anti-adversaries (Alfarra et al., AAAI 2022, "Combating Adversaries with Anti-Adversaries").

    y_hat = argmax f(x)                                       the classifier's own prediction (pseudo-label)
    g_0   = 0
    for k = 1..K:
        g_k = g_{k-1} - alpha * sign(grad_g CE(f(x + g), y_hat))      signed *descent*: raises y_hat's confidence
        g_k = Pi(g_k)                                              ttc-budget only: |g| <= eps, x + g in [0, 1]
    logits = f(x + g_K)

Checked in the official code (MotasemAlfarra/Combating-Adversaries-with-Anti-Adversaries @b91fc43, Anti_Adv.py):
the pseudo-label is the argmax on the incoming input, the anti-adversary starts at zero, each step subtracts
alpha * sign of the cross-entropy gradient, and there is neither an eps projection nor a [0,1] clamp. The AWP
experiment (`main.py --k 2 --alpha 0.15`) wraps a model without normalisation, so alpha = 0.15 is in [0,1] pixel
units (its ImageNet-pretrained experiment normalises with mean = std = 0.5 first: alpha in those units is half
as large in pixels).

Presets: `paper` (alias `original`; K = 2, alpha = 0.15, no projection, like the official code: x + g may leave
[0, 1] by up to K alpha; the encoder's input normalisation is affine, so such pixels are valid network inputs,
not valid images) and `ttc-budget` (K = 2, alpha = 1/255, projected onto eps = 4/255 and the [0,1] box: TTC's
perturbation budget and step count). `box=True` adds the [0,1] clamp to the paper preset.

Deviations: the pseudo-label comes from the same forward as the first gradient (g_0 = 0, so f(x + g_0) = f(x):
the official code runs that forward twice); the cross-entropy is summed over the batch (the official mean only
scales every image's gradient by 1/B, which sign() ignores). Cost per image: K + 1 forwards, K backwards,
K + 1 rounds. No random draws. `record["perturbation"]` is g_K (for BPDA; with the paper preset x + g_K is not
clamped to [0,1], so a BPDA attack that clamps differs from the defense where it leaves the box).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SccError
from ..grad import input_grad
from ..models import ZeroShotClassifier
from ..perturbation import project


@dataclass(frozen=True)
class AntiAdvConfig:
    steps: int = 2  # K  [official run: --k 2]
    alpha: float = 0.15  # step in [0,1] pixel units  [official run: --alpha 0.15]
    eps: float | None = None  # l_inf radius of the anti-adversary; None: no projection (official)
    box: bool = False  # clamp x + g to [0, 1] (official: no)

    def __post_init__(self):
        if self.steps < 1 or self.alpha <= 0:
            raise SccError(f"Anti-adv needs steps >= 1 and alpha > 0, got steps={self.steps}, alpha={self.alpha}")
        if self.eps is not None and not 0 < self.eps <= 1:
            raise SccError(f"eps must be in (0, 1] or None (no projection), got {self.eps}")


ANTI_ADV_DRAWS: dict = {}  # deterministic


def pseudo_label_ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `label` (B,) summed over the batch, written with a one-hot mask (no gather: its backward
    exports to plain ONNX ops)."""
    hot = (torch.arange(logits.shape[-1], device=logits.device) == label[:, None]).to(logits.dtype)  # (B, C)
    return -(torch.log_softmax(logits, -1) * hot).sum()


def anti_adversary(clf: ZeroShotClassifier, x: torch.Tensor, cfg: AntiAdvConfig,
                   trace: list | None = None) -> torch.Tensor:
    """The anti-adversary g_K (B, 3, H, W). `trace` collects each step's gradient sign."""
    def loss(g, label):
        logits = clf.logits_from_embedding(clf.embed(x + g))
        if label is None:  # the first step: the pseudo-label from this same forward (g = 0)
            label = logits.detach().argmax(-1)
        return pseudo_label_ce(logits, label), label

    grad_fn = input_grad(loss, has_aux=True)
    g, label = torch.zeros_like(x), None
    for _ in range(cfg.steps):
        grad, label = grad_fn(g, label)
        if trace is not None:
            trace.append(grad.sign())
        g = g - cfg.alpha * grad.sign().nan_to_num(0.0)  # descent
        if cfg.eps is not None:
            g = project(g, x, cfg.eps)
        elif cfg.box:
            g = torch.minimum(torch.maximum(g, -x), 1 - x)
    return g


def anti_adv(clf: ZeroShotClassifier, x: torch.Tensor, cfg: AntiAdvConfig, trace: list | None = None,
             record: dict | None = None) -> torch.Tensor:
    """Logits (B, C) of x + g_K; `record["perturbation"]` = g_K."""
    g = anti_adversary(clf, x, cfg, trace)
    if record is not None:
        record["perturbation"] = g
    return clf.logits_from_embedding(clf.embed(x + g))

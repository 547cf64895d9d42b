"""RN: random noise, the test-time baseline of TTC's Table 1 (TTC's code with zero counterattack steps).

    delta  = Pi(eps * u),  u ~ U(-1, 1) per pixel            one draw per image, clipped to the [0,1] box
    logits = s * cos(f(x + delta), T)

No gate and no gradient: one forward on the noisy image. eps is TTC's counterattack radius (4/255), so RN is
exactly TTC's random start without the counterattack; it is applied alike to clean and attacked inputs.

The noise `u` is a declared draw (shape of the image, uniform in [-1, 1]): secret and per image like every other
defense's draws, and replayable on every backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..draws import Draw, like_image
from ..errors import SccError
from ..models import ZeroShotClassifier
from ..perturbation import project


@dataclass(frozen=True)
class RNConfig:
    eps: float = 4 / 255  # noise radius, l_inf, pixel units (TTC's --ttc_eps)

    def __post_init__(self):
        if not 0 <= self.eps <= 1:
            raise SccError(f"RN needs 0 <= eps <= 1, got eps={self.eps}")


RN_DRAWS = {"noise": Draw("uniform", -1.0, 1.0, like_image)}  # u ~ U(-1, 1), (B, 3, H, W)


def rn(clf: ZeroShotClassifier, x: torch.Tensor, cfg: RNConfig, noise: torch.Tensor,
       trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """Logits (B, C) of x + Pi(eps * noise); `record`, a dict, receives that perturbation (B, 3, H, W)."""
    delta = project(cfg.eps * noise, x, cfg.eps)
    if record is not None:
        record["perturbation"] = delta
    return clf.logits_from_embedding(clf.embed(x + delta))

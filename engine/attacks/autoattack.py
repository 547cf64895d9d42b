"""AutoAttack's components (Croce & Hein, ICML 2020) on a model's logits: APGD, the step-size-free PGD, and
Square (Andriushchenko et al., ECCV 2020), the score-based black-box check for gradient masking.

    adv = apgd(model, x, y, eps=4/255, loss="ce", steps=100, seed=0)      # loss: "ce" | "dlr"
    adv = square(model, x, y, eps=4/255, queries=1000, seed=0)

One place builds them for the paper protocol (TTC's AutoAttack subset: APGD-CE + APGD-DLR, 100 iterations, one
restart) and for the adaptive suite. Today they are torchattacks' implementations (the `adaptive` extra).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import require_extra


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce", steps: int = 100,
         restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """L_inf APGD adversarial images for (x, y); `seed` seeds its random start (taken mod 2**31)."""
    require_extra("adaptive", ["torchattacks"], what=f"APGD-{loss.upper()}")
    import torchattacks

    return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, loss=loss,
                             seed=int(seed) % 2**31)(x, y)


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int = 1000,
           restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """L_inf Square adversarial images for (x, y) after at most `queries` model calls per image (margin loss)."""
    require_extra("adaptive", ["torchattacks"], what="the Square attack")
    import torchattacks

    return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=restarts,
                               seed=int(seed) % 2**31, loss="margin")(x, y)

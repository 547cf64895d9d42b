"""Top-1 agreement: the fraction of images two sets of answers give the same class, the one measure every
benchmark, backend check and test reports under the key `top1_agreement`.

    top1_agreement(compiled_logits, eager_logits)   # a backend against the reference, on the same draws
    top1_agreement(logits, targets)                 # labels on one side: the accuracy
"""
from __future__ import annotations

import torch

from .errors import SccError


def top1(t: torch.Tensor) -> torch.Tensor:
    """The class of each row: integer tensors are labels already, floating ones are logits (..., C), whose argmax
    over the last axis is taken; a logits row holding a NaN has no class (-1)."""
    if not t.is_floating_point():
        return t.long()
    return t.argmax(-1).masked_fill(t.isnan().any(-1), -1)


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows whose top-1 class is the same in a and b, each logits (..., C) or labels (...), on any
    device and in any dtype. A row without a class (NaN logits) agrees with nothing; no rows gives NaN. SccError
    when the shapes do not pair up (logits with logits need the same shape, labels the rows of the other side)."""
    rows = lambda t: t.shape[:-1] if t.is_floating_point() else t.shape
    if rows(a) != rows(b) or (a.is_floating_point() and b.is_floating_point() and a.shape != b.shape):
        raise SccError(f"top1_agreement: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")
    ta, tb = top1(a).cpu(), top1(b).cpu()
    return ((ta == tb) & (ta >= 0)).double().mean().item()  # an exact fraction: matches / rows

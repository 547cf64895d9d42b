"""Label-preserving views u_l(z) = clip(A_l z B_l^T + sigma * n_l, 0, 1), the views of SCC's spatial consistency.

A view is static (flip, zoom) plus an optional Gaussian noise draw n_l that the caller passes in, so every
backend sees the same views. Flip and zoom are linear maps along rows/columns: a centre zoom by `s` is a crop
of fraction s resized back with bilinear interpolation (align_corners=False, no antialias), written as a
(H, H) matrix; a flip reverses the column map. Views without zoom use `torch.flip`, views with zoom use two
small matmuls (static-shaped, differentiable, exportable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import SccError


@dataclass(frozen=True)
class View:
    flip: bool = False
    noise: bool = False
    zoom: float = 1.0

    @property
    def is_identity(self) -> bool:
        return not self.flip and not self.noise and self.zoom == 1.0


def parse_view(text: str) -> View:
    """'id' | 'flip' | 'noise' | 'zoom0.9' and '+' combinations, e.g. 'flip+noise', 'zoom0.85+noise'."""
    flip = noise = False
    zoom = 1.0
    for part in text.strip().lower().split("+"):
        if part in ("id", "identity"):
            continue
        elif part == "flip":
            flip = True
        elif part == "noise":
            noise = True
        elif part.startswith("zoom"):
            try:
                zoom = float(part[4:])
            except ValueError:
                raise SccError(f"bad zoom in view {text!r}: write e.g. 'zoom0.9'") from None
            if not 0.3 <= zoom <= 1.0:
                raise SccError(f"zoom must be in [0.3, 1], got {zoom} in view {text!r}")
        else:
            raise SccError(f"unknown view part {part!r} in {text!r}; use id, flip, noise, zoomS joined by '+'")
    return View(flip, noise, zoom)


def parse_views(views: Sequence[str] | str) -> tuple[View, ...]:
    if isinstance(views, str):
        views = views.split(",")
    out = tuple(parse_view(v) for v in views)
    if not out:
        raise SccError("at least one view is needed")
    return out


def zoom_matrix(size: int, zoom: float, flip: bool = False, dtype=torch.float32) -> torch.Tensor:
    """(size, size) M with (M @ v) = bilinear resize of the centred crop of fraction `zoom` of v (then flipped)."""
    crop = max(1, round(size * zoom))
    top = (size - crop) // 2
    eye = torch.eye(size, dtype=torch.float64)[top: top + crop]  # (crop, size): selects the crop
    m = F.interpolate(eye.t()[None], size=size, mode="linear", align_corners=False)[0].t()  # (size, size)
    if flip:
        m = m.flip(0)
    return m.to(dtype)


def apply_views(z: torch.Tensor, views: Sequence[View], noise: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """z (B, 3, H, W) -> views (B*L, 3, H, W), batch-major (row b*L + l is view l of image b).

    noise: (B, >=L, 3, H, W) standard normal draws; view l uses noise[:, l] when it has `noise`.
    """
    outs = []
    for l, v in enumerate(views):
        u = z
        if v.zoom != 1.0:
            m = zoom_matrix(z.shape[-1], v.zoom, v.flip, z.dtype).to(z.device)
            mh = m if z.shape[-2] == z.shape[-1] else zoom_matrix(z.shape[-2], v.zoom, False, z.dtype).to(z.device)
            u = mh @ u @ m.t()  # rows: (H,H) @ (B,3,H,W); cols: @ (W,W)^T
        elif v.flip:
            u = u.flip(-1)
        if v.noise:
            u = (u + sigma * noise[:, l]).clamp(0, 1)
        outs.append(u)
    B, L = z.shape[0], len(views)
    return torch.stack(outs, 1).reshape(B * L, *z.shape[1:])  # (B, L, 3, H, W) -> (B*L, 3, H, W)


def embed_views(clf, z: torch.Tensor, views: Sequence[View], noise: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """clf.embed(apply_views(z, views, noise, sigma)): (B*L, D), batch-major.

    Kernel dispatch is explicit: the classifier says which kernels run (`clf.kernels`, set only on an engine's
    own copy, scc.precision.engine_classifier), so two engines with different kernels serve in one process.
    With a "view_augment" kernel and no zoom view, one kernel writes the views already normalised. Its autograd
    does not run under torch.func.grad (https://github.com/pytorch/pytorch/issues/170834), so gradient closures
    call clf.embed(apply_views())."""
    kernel = clf.kernels.get("view_augment")
    if kernel is not None and clf.counter is None and all(v.zoom == 1.0 for v in views):
        return clf.visual(kernel(z, [v.flip for v in views], [v.noise for v in views], noise, sigma, clf.mean, clf.std))
    return clf.embed(apply_views(z, views, noise, sigma))

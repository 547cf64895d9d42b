"""One projected sign-gradient step, optionally writing the next step's views in the same pass.

    delta' = min(max(clamp(delta + alpha * sign(g), -eps, eps), -x), 1 - x)      (= scc.views.sign_step)
    views' = view_augment(x + delta')                                            (sign_step_views only)

One program per image row (b, c, h): x, delta and g are read once; delta' is written once, and with views the
L normalised view rows of x + delta' are written from registers (scc.kernels.view_augment.store_views).
No gradient flows through a sign step (sign has a zero derivative and the procedures step outside their
gradient closures), so no autograd is registered: differentiating through these ops raises.

`sign_step(...)` / `sign_step_views(...)` are the launchers (guards, Triton kernel or the reference);
`torch.ops.scc.sign_step` / `torch.ops.scc.sign_step_views` the custom ops. Kill switch: SCC_TRITON_STEP=0.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from scc.models import SccError
from scc.views import project

from . import view_augment as va
from .view_augment import row_coords, store_views
from ._launch import constexpr, is_interpreted, jit, row_block, tl, unsupported

SWITCH = "SCC_TRITON_STEP"


@jit
def _sign_step_kernel(delta_ptr, grad_ptr, x_ptr, out_ptr, noise_ptr, mean_ptr, std_ptr, views_ptr,
                      H, W, LN, alpha, eps, sigma,
                      L: constexpr, FLIPS: constexpr, NOISY: constexpr, BLOCK_W: constexpr):
    row = tl.program_id(0)  # (b, c, h) of x viewed as (B*3*H, W)
    w = tl.arange(0, BLOCK_W)
    in_row = w < W
    offs = row * W + w
    d = tl.load(delta_ptr + offs, mask=in_row, other=0.0)
    g = tl.load(grad_ptr + offs, mask=in_row, other=0.0)
    x = tl.load(x_ptr + offs, mask=in_row, other=0.0)
    d = d + alpha * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    d = tl.minimum(tl.maximum(d, -eps), eps)
    d = tl.minimum(tl.maximum(d, -x), 1.0 - x)
    tl.store(out_ptr + offs, d, mask=in_row)
    if L > 0:
        b, rest, c = row_coords(row, H)
        store_views(x + d, b, rest, w, in_row, noise_ptr, views_ptr, tl.load(mean_ptr + c),
                       tl.load(std_ptr + c), H, W, LN, sigma, L, FLIPS, NOISY)


INTERPRETED = is_interpreted(_sign_step_kernel)


def _launch(delta, grad, x, alpha, eps, flips, noisy, noise, sigma, mean, std, views):
    B, C, H, W = x.shape
    out = torch.empty_like(delta)
    LN = noise.shape[1] if noise is not None else 0
    _sign_step_kernel[(B * C * H,)](
        delta, grad, x, out, noise if noise is not None else x, mean if mean is not None else x,
        std if std is not None else x, views if views is not None else out, H, W, LN, alpha, eps, sigma,
        L=len(flips), FLIPS=va.bits(flips), NOISY=va.bits(noisy), BLOCK_W=row_block(W))
    return out


@torch.library.custom_op("scc::sign_step", mutates_args=())
def sign_step_op(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    return _launch(delta, grad, x, alpha, eps, [], [], None, 0.0, None, None, None)


@sign_step_op.register_fake
def _(delta, grad, x, alpha, eps):
    return torch.empty_like(delta)


@torch.library.custom_op("scc::sign_step_views", mutates_args=())
def sign_step_views_op(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float,
                       noise: Optional[torch.Tensor], mean: torch.Tensor, std: torch.Tensor, flips: list[bool],
                       noisy: list[bool], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    views = torch.empty((B * len(flips), C, H, W), device=x.device, dtype=x.dtype)
    out = _launch(delta, grad, x, alpha, eps, flips, noisy, noise, sigma, mean, std, views)
    return out, views


@sign_step_views_op.register_fake
def _(delta, grad, x, alpha, eps, noise, mean, std, flips, noisy, sigma):
    B, C, H, W = x.shape
    return torch.empty_like(delta), x.new_empty((B * len(flips), C, H, W))


def sign_step_ref(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """The torch reference (the body of scc.views.sign_step)."""
    return project(delta + alpha * grad.sign(), x, eps)


def sign_step_views_ref(delta, grad, x, alpha, eps, flips, noisy, noise, sigma, mean, std):
    d = sign_step_ref(delta, grad, x, alpha, eps)
    return d, va.view_augment_ref(x + d, flips, noisy, noise, sigma, mean, std)


def check_inputs(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise SccError(f"sign_step: x must be a float tensor (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
    for name, t in (("delta", delta), ("grad", grad)):
        if t.shape != x.shape:
            raise SccError(f"sign_step: {name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if not (alpha > 0 and eps > 0):
        raise SccError(f"sign_step: need alpha > 0 and eps > 0, got alpha={alpha}, eps={eps}")


def reason(x: torch.Tensor, *tensors: torch.Tensor, n_views: int = 0) -> str | None:
    """None when the Triton kernel takes these inputs, else why the reference runs instead."""
    why = unsupported(SWITCH, INTERPRETED, x.device, [t.dtype for t in (x, *tensors)], x.numel() * max(1, n_views))
    if why is None and len({t.dtype for t in (x, *tensors)}) > 1:
        return f"mixed dtypes {sorted({str(t.dtype) for t in (x, *tensors)})}"
    return why


def status(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """'triton' or 'reference (<why>)': which path `sign_step` takes for tensors on `device`."""
    why = unsupported(SWITCH, INTERPRETED, torch.device(device), [dtype], 0)
    return "triton" + (" (interpreter)" if INTERPRETED else "") if why is None else f"reference ({why})"


def sign_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """delta <- Pi(delta + alpha * sign(grad)), shapes (B, 3, H, W); see the module docstring."""
    check_inputs(delta, grad, x, alpha, eps)
    if reason(x, delta, grad) is not None:
        return sign_step_ref(delta, grad, x, alpha, eps)
    return sign_step_op(delta.contiguous(), grad.contiguous(), x.contiguous(), float(alpha), float(eps))


def sign_step_views(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float,
                    flips: Sequence[bool], noisy: Sequence[bool], noise: torch.Tensor | None, sigma: float,
                    mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta', views of x + delta') in one pass: delta' as `sign_step`, views as `view_augment` (B*L, 3, H, W)."""
    check_inputs(delta, grad, x, alpha, eps)
    va.check_inputs(x, flips, noisy, noise, mean, std)
    extra = (noise,) if any(noisy) else ()
    if reason(x, delta, grad, *extra, n_views=len(flips)) is not None or va.reason(x, len(flips), noise) is not None:
        return sign_step_views_ref(delta, grad, x, alpha, eps, flips, noisy, noise, sigma, mean, std)
    mean = mean.reshape(3).to(device=x.device, dtype=torch.float32).contiguous()
    std = std.reshape(3).to(device=x.device, dtype=torch.float32).contiguous()
    return sign_step_views_op(delta.contiguous(), grad.contiguous(), x.contiguous(), float(alpha), float(eps),
                              noise.contiguous() if extra else None, mean, std, [bool(f) for f in flips],
                              [bool(n) for n in noisy], float(sigma))

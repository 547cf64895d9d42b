"""One projected sign-gradient step in one pass.

    delta' = min(max(clamp(delta + alpha * sign(g), -eps, eps), -x), 1 - x)      (= scc.perturbation.sign_step)

One program per image row (b, c, h): x, delta and g are read once and delta' is written once.
No gradient flows through a sign step (sign has a zero derivative and the procedures step outside their
gradient closures), so no autograd is registered: differentiating through this op raises. A NaN gradient
entry takes no step (its sign counts as 0), in the kernel and in the reference alike.

`sign_step(...)` is the launcher (guards, Triton kernel or the reference `sign_step_ref`); `torch.ops.scc.sign_step`
the custom op. Kill switch: SCC_TRITON_STEP=0.
"""
from __future__ import annotations

import torch

from ..errors import SccError
from .. import perturbation

from . import _launch as common
from ._launch import constexpr, is_interpreted, jit, row_block, tl

SWITCH = "SCC_TRITON_STEP"


@jit
def _sign_step_kernel(delta_ptr, grad_ptr, x_ptr, out_ptr, W, alpha, eps, BLOCK_W: constexpr):
    row = tl.program_id(0)  # (b, c, h) of x viewed as (B*3*H, W)
    w = tl.arange(0, BLOCK_W)
    in_row = w < W
    offs = row * W + w
    d = tl.load(delta_ptr + offs, mask=in_row, other=0.0)
    g = tl.load(grad_ptr + offs, mask=in_row, other=0.0)
    x = tl.load(x_ptr + offs, mask=in_row, other=0.0)
    d = d + alpha * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))  # NaN: no step
    d = tl.minimum(tl.maximum(d, -eps), eps)
    d = tl.minimum(tl.maximum(d, -x), 1.0 - x)
    tl.store(out_ptr + offs, d, mask=in_row)


INTERPRETED = is_interpreted(_sign_step_kernel)


def _launch(delta, grad, x, alpha, eps):
    B, C, H, W = x.shape
    out = torch.empty_like(delta)
    _sign_step_kernel[(B * C * H,)](delta, grad, x, out, W, alpha, eps, BLOCK_W=row_block(W))
    return out


@torch.library.custom_op("scc::sign_step", mutates_args=())
def sign_step_op(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    return _launch(delta, grad, x, alpha, eps)


@sign_step_op.register_fake
def _(delta, grad, x, alpha, eps):
    return torch.empty_like(delta)


def sign_step_ref(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """The torch reference: scc.perturbation.sign_step itself (no kernels); a NaN gradient entry takes no step."""
    return perturbation.sign_step(delta, grad, x, alpha, eps)


def check_inputs(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise SccError(f"sign_step: x must be a float tensor (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")
    for name, t in (("delta", delta), ("grad", grad)):
        if t.shape != x.shape:
            raise SccError(f"sign_step: {name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    if not (alpha > 0 and eps > 0):
        raise SccError(f"sign_step: need alpha > 0 and eps > 0, got alpha={alpha}, eps={eps}")


def reason(x: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    """None when the Triton kernel takes these inputs, else why the reference runs instead."""
    return common.reason(SWITCH, INTERPRETED, (x, *tensors), x.numel())


def status(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Which path `sign_step` takes for tensors on `device` (see scc.kernels._launch.status)."""
    return common.status(SWITCH, INTERPRETED, device, dtype)


def sign_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """delta <- Pi(delta + alpha * sign(grad)), shapes (B, 3, H, W); see the module docstring."""
    check_inputs(delta, grad, x, alpha, eps)
    if reason(x, delta, grad) is not None:
        return sign_step_ref(delta, grad, x, alpha, eps)
    return sign_step_op(delta.contiguous(), grad.contiguous(), x.contiguous(), float(alpha), float(eps))

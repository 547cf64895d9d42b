"""All L views of an image batch, already CLIP-normalised, in one pass; and its adjoint (the backward).

    out[b*L + l] = (u_l(z[b]) - mean) / std        (B*L, C, H, W), batch-major like scc.defenses.views.apply_views
    u_l(z)       = clip(flip_l(z) + sigma * noise[b, l], 0, 1)   on a noisy view,   flip_l(z) otherwise
    adjoint      : grad_z = sum_l flip_l(mask_l * grad_l) / std,  mask_l = [0 < flip_l(z) + sigma*noise_l < 1]
                   (1 on views without noise). At the bounds themselves (pre-clamp value exactly 0 or 1) the mask
                   follows the running torch's clamp backward, probed at import (`CLAMP_GRAD_AT_BOUNDS`):
                   torch 2.11 passes the gradient there, torch 2.14 does not; the kernel agrees with
                   `view_augment_ref` (torch.clamp) on either

One program per image row (b, c, h): the row of z is read once and the L view rows are written from it (a
flipped view writes the row reversed); the adjoint reads the L gradient rows of one image row and writes it
once. Views with zoom are not handled here: scc.defenses.views keeps them on the torch path.

`view_augment(...)` is the launcher (shape/dtype guards, Triton kernel or the reference `view_augment_ref`);
`torch.ops.scc.view_augment` is the custom op it calls (fake + autograd registered, so torch.compile with
fullgraph traces through it). Kill switch: SCC_TRITON_VIEWS=0. `status(device)` says which path runs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import SccError
from ..defenses.views import View, apply_views

from . import _launch as common
from ._launch import constexpr, is_interpreted, jit, row_block, tl

SWITCH = "SCC_TRITON_VIEWS"


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@jit
def row_coords(row, H):
    """Row index of a (B*3*H, W) view of an image batch -> (b, rest = c*H + h, c)."""
    b = row // (3 * H)
    rest = row - b * 3 * H
    return b, rest, rest // H


@jit
def store_views(z, b, rest, w, in_row, noise_ptr, out_ptr, mean, std, H, W, LN, sigma,
                L: constexpr, FLIPS: constexpr, NOISY: constexpr):
    """Write the L normalised views of one image row z[b, c, h, :] (`rest` = c*H + h, values at columns w).

    FLIPS / NOISY: bit l set when view l is flipped / noisy. View l of the row goes to row (b*L + l)*3*H + rest
    of out viewed as (B*L*3*H, W); its noise is row (b*LN + l)*3*H + rest of noise viewed as (B*LN*3*H, W).
    """
    for l in tl.static_range(L):
        if (FLIPS >> l) & 1:
            col = W - 1 - w  # the output column that receives z[w]
        else:
            col = w
        v = z
        if (NOISY >> l) & 1:
            n = tl.load(noise_ptr + ((b * LN + l) * 3 * H + rest) * W + col, mask=in_row, other=0.0)
            v = tl.minimum(tl.maximum(z + sigma * n, 0.0), 1.0)
        tl.store(out_ptr + ((b * L + l) * 3 * H + rest) * W + col, (v - mean) / std, mask=in_row)


@jit
def _views_kernel(z_ptr, noise_ptr, mean_ptr, std_ptr, out_ptr, H, W, LN, sigma,
                  L: constexpr, FLIPS: constexpr, NOISY: constexpr, BLOCK_W: constexpr):
    row = tl.program_id(0)  # (b, c, h) of z viewed as (B*3*H, W)
    w = tl.arange(0, BLOCK_W)
    in_row = w < W
    b, rest, c = row_coords(row, H)
    z = tl.load(z_ptr + row * W + w, mask=in_row, other=0.0)
    store_views(z, b, rest, w, in_row, noise_ptr, out_ptr, tl.load(mean_ptr + c), tl.load(std_ptr + c), H, W, LN,
                sigma, L, FLIPS, NOISY)


@jit
def _adjoint_kernel(grad_ptr, z_ptr, noise_ptr, std_ptr, out_ptr, H, W, LN, sigma,
                    L: constexpr, FLIPS: constexpr, NOISY: constexpr, BLOCK_W: constexpr, AT_BOUNDS: constexpr):
    row = tl.program_id(0)  # (b, c, h) of grad_z viewed as (B*3*H, W)
    w = tl.arange(0, BLOCK_W)
    in_row = w < W
    b, rest, c = row_coords(row, H)
    z = tl.load(z_ptr + row * W + w, mask=in_row, other=0.0)
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for l in tl.static_range(L):
        if (FLIPS >> l) & 1:
            col = W - 1 - w
        else:
            col = w
        g = tl.load(grad_ptr + ((b * L + l) * 3 * H + rest) * W + col, mask=in_row, other=0.0).to(tl.float32)
        if (NOISY >> l) & 1:
            n = tl.load(noise_ptr + ((b * LN + l) * 3 * H + rest) * W + col, mask=in_row, other=0.0)
            pre = z + sigma * n
            if AT_BOUNDS:  # this torch's clamp backward passes the gradient at 0 and 1 themselves
                g = tl.where((pre >= 0.0) & (pre <= 1.0), g, 0.0)
            else:
                g = tl.where((pre > 0.0) & (pre < 1.0), g, 0.0)
        acc += g
    tl.store(out_ptr + row * W + w, acc / tl.load(std_ptr + c), mask=in_row)


INTERPRETED = is_interpreted(_views_kernel)


def clamp_grad_at_bounds() -> bool:
    """Whether this torch's clamp(0, 1) backward passes the gradient at the bounds themselves (a value exactly 0
    or 1). It changed between torch releases (2.11: it does; 2.14: it does not), and the reference's adjoint is
    torch.clamp's, so the kernel's mask asks torch instead of assuming."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        (grad,) = torch.autograd.grad(x.clamp(0.0, 1.0).sum(), x)
    return bool(grad.all())


CLAMP_GRAD_AT_BOUNDS = clamp_grad_at_bounds()


def bits(flags: Sequence[bool]) -> int:
    return sum(1 << i for i, f in enumerate(flags) if f)


def _launch_args(z, noise, flips, noisy):
    B, C, H, W = z.shape
    noise_arg = noise if noise is not None else z  # never read when no view is noisy
    LN = noise.shape[1] if noise is not None else 0
    meta = dict(L=len(flips), FLIPS=bits(flips), NOISY=bits(noisy), BLOCK_W=row_block(W))
    return (B * C * H,), noise_arg, (H, W, LN), meta


# ----------------------------------------------------------------------------------------------------------
# Custom ops (what torch.compile sees)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("scc::view_augment", mutates_args=())
def view_augment_op(z: torch.Tensor, noise: Optional[torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
                    flips: list[bool], noisy: list[bool], sigma: float) -> torch.Tensor:
    B, C, H, W = z.shape
    out = torch.empty((B * len(flips), C, H, W), device=z.device, dtype=z.dtype)
    grid, noise_arg, dims, meta = _launch_args(z, noise, flips, noisy)
    _views_kernel[grid](z, noise_arg, mean, std, out, *dims, sigma, **meta)
    return out


@view_augment_op.register_fake
def _(z, noise, mean, std, flips, noisy, sigma):
    B, C, H, W = z.shape
    return z.new_empty((B * len(flips), C, H, W))


@torch.library.custom_op("scc::view_augment_adjoint", mutates_args=())
def view_augment_adjoint_op(grad: torch.Tensor, z: torch.Tensor, noise: Optional[torch.Tensor], std: torch.Tensor,
                            flips: list[bool], noisy: list[bool], sigma: float) -> torch.Tensor:
    out = torch.empty_like(z)
    grid, noise_arg, dims, meta = _launch_args(z, noise, flips, noisy)
    _adjoint_kernel[grid](grad, z, noise_arg, std, out, *dims, sigma, AT_BOUNDS=CLAMP_GRAD_AT_BOUNDS, **meta)
    return out


@view_augment_adjoint_op.register_fake
def _(grad, z, noise, std, flips, noisy, sigma):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, noise, mean, std, flips, noisy, sigma = inputs
    ctx.save_for_backward(z, noise, std)
    ctx.flips, ctx.noisy, ctx.sigma = flips, noisy, sigma


def _backward(ctx, grad):
    z, noise, std = ctx.saved_tensors
    grad_z = view_augment_adjoint_op(grad.contiguous(), z, noise, std, ctx.flips, ctx.noisy, ctx.sigma)
    return grad_z, None, None, None, None, None, None  # the noise and the normalisation are constants


view_augment_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Reference and launcher
# ----------------------------------------------------------------------------------------------------------
def view_augment_ref(z: torch.Tensor, flips: Sequence[bool], noisy: Sequence[bool], noise: torch.Tensor | None,
                     sigma: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The torch reference: scc.defenses.views.apply_views, then the classifier's normalisation."""
    views = [View(flip=bool(f), noise=bool(n)) for f, n in zip(flips, noisy)]
    u = apply_views(z, views, noise, sigma)  # (B*L, C, H, W)
    return (u - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def view_augment_adjoint_ref(grad: torch.Tensor, z: torch.Tensor, flips: Sequence[bool], noisy: Sequence[bool],
                             noise: torch.Tensor | None, sigma: float, mean: torch.Tensor,
                             std: torch.Tensor) -> torch.Tensor:
    """The reference adjoint: the vector-Jacobian product of `view_augment_ref` with respect to z."""
    _, vjp = torch.func.vjp(lambda zz: view_augment_ref(zz, flips, noisy, noise, sigma, mean, std), z)
    return vjp(grad)[0]


def check_inputs(z, flips, noisy, noise, mean, std) -> None:
    """Raise SccError (naming the bad value) on inputs that neither the kernel nor the reference can take."""
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != 3 or not z.is_floating_point():
        raise SccError(f"view_augment: z must be a float tensor (B, 3, H, W), got "
                       f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if len(flips) != len(noisy) or not 1 <= len(flips) <= 32:
        raise SccError(f"view_augment: need 1..32 views with one flip and one noise flag each, got "
                       f"{len(flips)} flips and {len(noisy)} noise flags")
    if mean.numel() != 3 or std.numel() != 3:
        raise SccError(f"view_augment: mean and std need 3 values (one per channel), got {mean.numel()} and "
                       f"{std.numel()}")
    if any(noisy):
        want = (z.shape[0], len(flips), *z.shape[1:])
        if noise is None or noise.dim() != 5 or noise.shape[0] != want[0] or noise.shape[1] < want[1] \
                or noise.shape[2:] != z.shape[1:]:
            got = None if noise is None else tuple(noise.shape)
            raise SccError(f"view_augment: noisy views need noise of shape (B, >=L, 3, H, W) = {want}, got {got}")


def reason(z: torch.Tensor, n_views: int, noise: torch.Tensor | None = None) -> str | None:
    """None when the Triton kernel takes these inputs, else why the reference runs instead."""
    numel = max(z.numel() * n_views, noise.numel() if noise is not None else 0)
    return common.reason(SWITCH, INTERPRETED, (z, noise), numel)


def status(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Which path `view_augment` takes for tensors on `device` (see scc.kernels._launch.status)."""
    return common.status(SWITCH, INTERPRETED, device, dtype)


def view_augment(z: torch.Tensor, flips: Sequence[bool], noisy: Sequence[bool], noise: torch.Tensor | None,
                 sigma: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B*L, 3, H, W) normalised views (see the module docstring); differentiable in z."""
    check_inputs(z, flips, noisy, noise, mean, std)
    if reason(z, len(flips), noise) is not None:
        return view_augment_ref(z, flips, noisy, noise, sigma, mean, std)
    noise = noise.contiguous() if any(noisy) else None
    mean = mean.reshape(3).to(device=z.device, dtype=torch.float32).contiguous()
    std = std.reshape(3).to(device=z.device, dtype=torch.float32).contiguous()
    return view_augment_op(z.contiguous(), noise, mean, std, [bool(f) for f in flips], [bool(n) for n in noisy],
                           float(sigma))

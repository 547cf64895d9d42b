"""scc.kernels.view_augment: the Triton view kernel and its adjoint against the torch reference.

Runs on CUDA when there is a GPU, else on CPU under triton's interpreter: on a CPU-only machine without
TRITON_INTERPRET=1 the whole module re-runs itself in a fresh process that has it (see conftest.py).
"""
import importlib

import pytest
import torch

from scc.errors import SccError
from scc.defenses.views import apply_views, parse_views

# The device (kernel_device), the dtypes (kernel_dtype) and the comparison (kernel_close) are conftest.py's.
# fp32 differs from the reference by rounding order only (fma, sum-then-divide): atol 2e-6, rtol 1e-5. bf16 (CUDA
# only; the interpreter runs fp32): at most twice the error the torch reference itself makes in bf16 against
# fp32 (see `tolerance`), never a fixed constant.
VIEW_SETS = {
    1: "flip+noise",
    4: "id,flip,noise,flip+noise",
    8: "id,flip,noise,flip+noise,noise,flip,flip+noise,id",
}
# (H, W): odd, non-square; W = 33 and 224 span several 16-wide blocks and a full CLIP row (32x32 runs in
# test_compiled under the interpreter)
SHAPES = [(5, 7), (9, 16), (4, 33), (2, 224)]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def inputs(device, B, L, H, W, dtype, sigma=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.rand(B, 3, H, W, generator=gen)
    z[:, :, 0, :2] = 0.0  # exact box bounds: torch.clamp passes no gradient at them
    z[:, :, -1, -2:] = 1.0
    noise = torch.randn(B, L + 1, 3, H, W, generator=gen)  # one more noise view than used: checks the stride
    views = parse_views(VIEW_SETS[L])
    flips, noisy = [v.flip for v in views], [v.noise for v in views]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    to = dict(device=device, dtype=dtype)
    return z.to(**to), flips, noisy, noise.to(**to), sigma, mean.to(device), std.to(device)


def tolerance(dtype, z, flips, noisy, noise, sigma, mean, std) -> tuple[float, float]:
    """(atol, rtol) of `dtype` views against the fp32 reference."""
    from scc.kernels import view_augment as va

    if dtype == torch.float32:
        return 2e-6, 1e-5
    ref32 = va.view_augment_ref(z.float(), flips, noisy, noise.float(), sigma, mean, std)
    own = (va.view_augment_ref(z, flips, noisy, noise, sigma, mean.to(dtype), std.to(dtype)).float() - ref32)
    return 2 * own.abs().max().item() + 1e-6, 0.0


@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("L", sorted(VIEW_SETS))
@pytest.mark.parametrize("B", [1, 3])
def test_forward_matches_reference(B, L, H, W, kernel_dtype, kernel_device, kernel_close):
    from scc.kernels import view_augment as va

    dtype = kernel_dtype
    assert va.status(kernel_device, dtype).startswith("triton"), va.status(kernel_device, dtype)
    z, flips, noisy, noise, sigma, mean, std = inputs(kernel_device, B, L, H, W, dtype)
    out = va.view_augment(z, flips, noisy, noise, sigma, mean, std)
    ref = va.view_augment_ref(z.float(), flips, noisy, noise.float(), sigma, mean, std)
    assert out.shape == (B * L, 3, H, W) and out.dtype == dtype
    atol, rtol = tolerance(dtype, z, flips, noisy, noise, sigma, mean, std)
    kernel_close(out, ref, atol, rtol, f"views B={B} L={L} {H}x{W} {dtype}")
    # and the reference is the engine's own path: apply_views, then the classifier's normalisation
    eager = (apply_views(z.float(), parse_views(VIEW_SETS[L]), noise.float(), sigma) - mean) / std
    torch.testing.assert_close(ref, eager, atol=0, rtol=0)


@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("L", sorted(VIEW_SETS))
@pytest.mark.parametrize("B", [1, 3])
def test_adjoint_and_autograd(B, L, H, W, kernel_device, kernel_close):
    from scc.kernels import view_augment as va

    z, flips, noisy, noise, sigma, mean, std = inputs(kernel_device, B, L, H, W, torch.float32, seed=1)
    grad = torch.randn(B * L, 3, H, W, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    ref = va.view_augment_adjoint_ref(grad, z, flips, noisy, noise, sigma, mean, std)
    adj = va.view_augment_adjoint_op(grad, z, noise, std.reshape(3), flips, noisy, sigma)
    kernel_close(adj, ref, 2e-6, 1e-5, f"adjoint B={B} L={L} {H}x{W}")
    zz = z.clone().requires_grad_(True)
    (g_kernel,) = torch.autograd.grad(va.view_augment(zz, flips, noisy, noise, sigma, mean, std), zz, grad)
    kernel_close(g_kernel, ref, 2e-6, 1e-5, f"autograd through the op B={B} L={L} {H}x{W}")


def test_clamp_bounds_block_gradient(kernel_device, kernel_close):
    """sigma = 0 puts every pre-clamp value of a noisy view on z itself, including exact 0s and 1s."""
    from scc.kernels import view_augment as va

    z, flips, noisy, noise, _, mean, std = inputs(kernel_device, 2, 4, 6, 5, torch.float32)
    grad = torch.ones(8, 3, 6, 5, device=kernel_device)
    ref = va.view_augment_adjoint_ref(grad, z, flips, noisy, noise, 0.0, mean, std)
    adj = va.view_augment_adjoint_op(grad, z, noise, std.reshape(3), flips, noisy, 0.0)
    kernel_close(adj, ref, 2e-6, 1e-5, "adjoint at the clamp bounds")


@pytest.mark.parametrize("L", [1, 4])
def test_opcheck(L, kernel_device):
    importlib.import_module("scc.kernels.view_augment")  # registers torch.ops.scc.view_augment

    z, flips, noisy, noise, sigma, mean, std = inputs(kernel_device, 3, L, 5, 7, torch.float32)
    torch.library.opcheck(torch.ops.scc.view_augment.default, (z, noise, mean.reshape(3), std.reshape(3), flips, noisy, sigma))
    grad = torch.randn(3 * L, 3, 5, 7, device=kernel_device)
    torch.library.opcheck(torch.ops.scc.view_augment_adjoint.default,
                          (grad, z, noise, std.reshape(3), flips, noisy, sigma))


@pytest.mark.compile
def test_compiles_without_graph_break(kernel_device, kernel_close):
    from scc.kernels import view_augment as va

    z, flips, noisy, noise, sigma, mean, std = inputs(kernel_device, 3, 4, 8, 12, torch.float32)
    fn = torch.compile(lambda t: va.view_augment(t, flips, noisy, noise, sigma, mean, std).sum(1),
                       fullgraph=True, dynamic=False)
    kernel_close(fn(z), va.view_augment_ref(z, flips, noisy, noise, sigma, mean, std).sum(1), 1e-5, 1e-5,
                "compiled view_augment")


def test_kill_switch_and_guards(monkeypatch, kernel_device):
    from scc.kernels import view_augment as va

    z, flips, noisy, noise, sigma, mean, std = inputs(kernel_device, 1, 4, 5, 7, torch.float32)
    monkeypatch.setenv("SCC_TRITON_VIEWS", "0")
    assert va.status(kernel_device) == "reference (SCC_TRITON_VIEWS=0)"
    torch.testing.assert_close(va.view_augment(z, flips, noisy, noise, sigma, mean, std),
                               va.view_augment_ref(z, flips, noisy, noise, sigma, mean, std), atol=0, rtol=0)
    monkeypatch.delenv("SCC_TRITON_VIEWS")
    with pytest.raises(SccError, match=r"noise of shape \(B, >=L, 3, H, W\) = \(1, 4, 3, 5, 7\), got \(1, 2, 3, 5, 7\)"):
        va.view_augment(z, flips, noisy, noise[:, :2], sigma, mean, std)
    with pytest.raises(SccError, match="z must be a float tensor"):
        va.view_augment(z[:, :2], flips, noisy, noise, sigma, mean, std)
    with pytest.raises(SccError, match="one flip and one noise flag each"):
        va.view_augment(z, flips[:3], noisy, noise, sigma, mean, std)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    """Outside the interpreter a CPU tensor takes the reference, and status says why."""
    from scc.kernels import view_augment as va

    monkeypatch.setattr(va, "INTERPRETED", False)
    assert va.status("cpu").startswith("reference (cpu tensors need the Triton interpreter")
    gen = torch.Generator().manual_seed(0)
    z, noise = torch.rand(2, 3, 5, 7, generator=gen), torch.randn(2, 2, 3, 5, 7, generator=gen)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    args = (z, [True, False], [False, True], noise, 0.1, mean, std)
    torch.testing.assert_close(va.view_augment(*args), va.view_augment_ref(*args), atol=0, rtol=0)


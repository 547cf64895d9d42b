"""scc.kernels.sign_step: the fused projected sign step against the torch reference.

Runs on CUDA when there is a GPU, else on CPU under triton's interpreter: on a CPU-only machine without
TRITON_INTERPRET=1 the whole module re-runs itself in a fresh process that has it (see conftest.py).
"""
import pytest
import torch

from scc.errors import SccError
from scc.perturbation import sign_step as eager_sign_step

# The device (kernel_device), the dtypes (kernel_dtype) and the comparison (kernel_close) are conftest.py's.
# fp32: the step is exact up to a fused multiply-add (one ulp of delta). bf16 (CUDA only: the interpreter runs
# fp32): the kernel may differ from the fp32 reference by at most twice what the torch reference itself loses
# when it runs in bf16 (its own error vs fp32), plus one bf16 ulp of eps.
# odd and non-square; W = 33 and 224 span more than one 16/32-wide block and a full CLIP row
SHAPES = [(5, 7), (9, 16), (4, 33), (2, 224)]
ALPHA, EPS = 1 / 255, 4 / 255


def inputs(device, B, H, W, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=gen)
    x[:, :, 0] = 0.0  # box bounds: the projection to [-x, 1-x] is active there
    x[:, :, -1] = 1.0
    delta = (torch.rand(B, 3, H, W, generator=gen) * 2 - 1) * EPS
    delta[:, 0, 1] = EPS  # on the eps bound
    grad = torch.randn(B, 3, H, W, generator=gen)
    grad[:, 1, 1] = 0.0  # sign(0) = 0: no step
    to = dict(device=device, dtype=dtype)
    return delta.to(**to), grad.to(**to), x.to(**to)


def tolerance(dtype, delta, grad, x) -> float:
    """atol of a `dtype` step against the fp32 reference: 2e-6 in fp32; in bf16 twice the error of the torch
    reference run in bf16 (its own rounding) plus one bf16 ulp of eps."""
    if dtype == torch.float32:
        return 2e-6
    ref32 = eager_sign_step(delta.float(), grad.float(), x.float(), ALPHA, EPS)
    own = (eager_sign_step(delta, grad, x, ALPHA, EPS).float() - ref32).abs().max().item()
    return 2 * own + EPS * 2**-8


@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("B", [1, 3])
def test_step_matches_reference(B, H, W, kernel_dtype, kernel_device, kernel_close):
    from scc.kernels import sign_step as ss

    dtype = kernel_dtype
    assert ss.status(kernel_device, dtype).startswith("triton"), ss.status(kernel_device, dtype)
    delta, grad, x = inputs(kernel_device, B, H, W, dtype)
    out = ss.sign_step(delta, grad, x, ALPHA, EPS)
    ref = ss.sign_step_ref(delta.float(), grad.float(), x.float(), ALPHA, EPS)
    kernel_close(out, ref, tolerance(dtype, delta, grad, x), 0, f"sign step B={B} {H}x{W} {dtype}")
    assert out.abs().max() <= EPS + 1e-7 and (x + out).min() >= -1e-6 and (x + out).max() <= 1 + 1e-6
    # the reference is the engine's own sign step
    torch.testing.assert_close(ref, eager_sign_step(delta.float(), grad.float(), x.float(), ALPHA, EPS), atol=0, rtol=0)


def test_nan_gradient_takes_no_step(kernel_device, kernel_close):
    """A NaN gradient entry (a degenerate input) leaves delta as it is, in the kernel and the reference alike."""
    from scc.kernels import sign_step as ss

    delta, grad, x = inputs(kernel_device, 2, 5, 33, torch.float32, seed=3)
    grad[0, 0, 2, 5] = float("nan")
    grad[1, 2, :, 30:] = float("nan")
    out, ref = ss.sign_step(delta, grad, x, ALPHA, EPS), ss.sign_step_ref(delta, grad, x, ALPHA, EPS)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    kernel_close(out, ref, 2e-6, 0, "NaN gradient")
    nan = torch.isnan(grad)
    torch.testing.assert_close(out[nan], ss.sign_step_ref(delta, torch.zeros_like(grad), x, ALPHA, EPS)[nan])


def test_opcheck_and_no_autograd(kernel_device):
    from scc.kernels import sign_step as ss

    delta, grad, x = inputs(kernel_device, 3, 5, 7, torch.float32)
    torch.library.opcheck(torch.ops.scc.sign_step.default, (delta, grad, x, ALPHA, EPS))
    out = ss.sign_step(delta.requires_grad_(True), grad, x, ALPHA, EPS)
    with pytest.raises(RuntimeError, match="autograd"):  # a sign step is never differentiated: say so loudly
        out.sum().backward()


@pytest.mark.compile
def test_compiles_without_graph_break(kernel_device, kernel_close):
    from scc.kernels import sign_step as ss

    delta, grad, x = inputs(kernel_device, 3, 9, 16, torch.float32)
    fn = torch.compile(lambda d, g: ss.sign_step(ss.sign_step(d, g, x, ALPHA, EPS), -g, x, ALPHA, EPS),
                       fullgraph=True, dynamic=False)
    ref = ss.sign_step_ref(ss.sign_step_ref(delta, grad, x, ALPHA, EPS), -grad, x, ALPHA, EPS)
    kernel_close(fn(delta, grad), ref, 2e-6, 1e-5, "two compiled steps")


def test_kill_switch_and_guards(monkeypatch, kernel_device):
    from scc.kernels import sign_step as ss

    delta, grad, x = inputs(kernel_device, 1, 5, 7, torch.float32)
    monkeypatch.setenv("SCC_TRITON_STEP", "0")
    assert ss.status(kernel_device) == "reference (SCC_TRITON_STEP=0)"
    torch.testing.assert_close(ss.sign_step(delta, grad, x, ALPHA, EPS), ss.sign_step_ref(delta, grad, x, ALPHA, EPS))
    monkeypatch.delenv("SCC_TRITON_STEP")
    with pytest.raises(SccError, match=r"grad must have the shape of x \(1, 3, 5, 7\), got \(1, 3, 5, 6\)"):
        ss.sign_step(delta, grad[..., :6], x, ALPHA, EPS)
    with pytest.raises(SccError, match="alpha > 0 and eps > 0"):
        ss.sign_step(delta, grad, x, ALPHA, 0.0)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    from scc.kernels import sign_step as ss

    monkeypatch.setattr(ss, "INTERPRETED", False)
    assert ss.status("cpu").startswith("reference (cpu tensors need the Triton interpreter")
    gen = torch.Generator().manual_seed(0)
    x, g = torch.rand(2, 3, 5, 7, generator=gen), torch.randn(2, 3, 5, 7, generator=gen)
    d = torch.zeros_like(x)
    torch.testing.assert_close(ss.sign_step(d, g, x, ALPHA, EPS), ss.sign_step_ref(d, g, x, ALPHA, EPS), atol=0, rtol=0)


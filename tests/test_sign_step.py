"""scc.kernels.sign_step: the fused projected sign step (and its next-step views) against the torch reference.

Runs on CUDA when there is a GPU, else on CPU under triton's interpreter: on a CPU-only machine without
TRITON_INTERPRET=1 the whole module re-runs itself in a fresh process that has it (see conftest.py).
"""
import os

import pytest
import torch

from scc.models import SccError
from scc.views import parse_views, sign_step as eager_sign_step

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
kernel_only = pytest.mark.skipif(DEVICE is None, reason="no GPU and no TRITON_INTERPRET=1: see test_under_interpreter")

# (dtype, atol, rtol). The step itself is exact up to a fused multiply-add (one ulp of delta); the views carry
# the view kernel's tolerance.
TOLERANCES = [(torch.float32, 2e-6, 1e-5)] + ([(torch.bfloat16, 2e-2, 2e-2)] if DEVICE == "cuda" else [])
VIEW_SETS = {0: None, 1: "flip+noise", 4: "id,flip,noise,flip+noise", 8: "id,flip,noise,flip+noise,noise,flip,flip+noise,id"}
SHAPES = [(5, 7), (9, 16)]
ALPHA, EPS = 1 / 255, 4 / 255
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


def inputs(B, H, W, dtype, L=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=gen)
    x[:, :, 0] = 0.0  # box bounds: the projection to [-x, 1-x] is active there
    x[:, :, -1] = 1.0
    delta = (torch.rand(B, 3, H, W, generator=gen) * 2 - 1) * EPS
    delta[:, 0, 1] = EPS  # on the eps bound
    grad = torch.randn(B, 3, H, W, generator=gen)
    grad[:, 1, 1] = 0.0  # sign(0) = 0: no step
    noise = torch.randn(B, L + 1, 3, H, W, generator=gen)
    to = dict(device=DEVICE, dtype=dtype)
    return delta.to(**to), grad.to(**to), x.to(**to), noise.to(**to)


def check_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}\nshape {tuple(actual.shape)}, worst at flat index "
                                             f"{(actual.float() - expected.float()).abs().argmax().item()}")


@kernel_only
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("B", [1, 3])
def test_step_matches_reference(B, H, W, dtype, atol, rtol):
    from scc.kernels import sign_step as ss

    assert ss.status(DEVICE, dtype).startswith("triton"), ss.status(DEVICE, dtype)
    delta, grad, x, _ = inputs(B, H, W, dtype)
    out = ss.sign_step(delta, grad, x, ALPHA, EPS)
    ref = ss.sign_step_ref(delta.float(), grad.float(), x.float(), ALPHA, EPS)
    check_close(out, ref, atol, rtol, f"sign step B={B} {H}x{W} {dtype}")
    assert out.abs().max() <= EPS + 1e-7 and (x + out).min() >= -1e-6 and (x + out).max() <= 1 + 1e-6
    # the reference is the engine's own sign step
    torch.testing.assert_close(ref, eager_sign_step(delta.float(), grad.float(), x.float(), ALPHA, EPS), atol=0, rtol=0)


@kernel_only
@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("L", [1, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
def test_step_writes_next_views(B, L, H, W):
    from scc.kernels import sign_step as ss
    from scc.kernels import view_augment as va

    delta, grad, x, noise = inputs(B, H, W, torch.float32, L=L, seed=L)
    views = parse_views(VIEW_SETS[L])
    flips, noisy = [v.flip for v in views], [v.noise for v in views]
    mean, std = MEAN.to(DEVICE), STD.to(DEVICE)
    d, v = ss.sign_step_views(delta, grad, x, ALPHA, EPS, flips, noisy, noise, 0.3, mean, std)
    d_ref, v_ref = ss.sign_step_views_ref(delta, grad, x, ALPHA, EPS, flips, noisy, noise, 0.3, mean, std)
    check_close(d, d_ref, 2e-6, 1e-5, f"fused step B={B} L={L} {H}x{W}")
    check_close(v, v_ref, 2e-6, 1e-5, f"fused step's views B={B} L={L} {H}x{W}")
    check_close(v, va.view_augment(x + d, flips, noisy, noise, 0.3, mean, std), 2e-6, 1e-5, "views vs the view kernel")


@kernel_only
def test_opcheck_and_no_autograd():
    from scc.kernels import sign_step as ss

    delta, grad, x, noise = inputs(3, 5, 7, torch.float32, L=4)
    torch.library.opcheck(torch.ops.scc.sign_step.default, (delta, grad, x, ALPHA, EPS))
    views = parse_views(VIEW_SETS[4])
    torch.library.opcheck(torch.ops.scc.sign_step_views.default,
                          (delta, grad, x, ALPHA, EPS, noise, MEAN.to(DEVICE), STD.to(DEVICE),
                           [v.flip for v in views], [v.noise for v in views], 0.3))
    out = ss.sign_step(delta.requires_grad_(True), grad, x, ALPHA, EPS)
    with pytest.raises(RuntimeError, match="autograd"):  # a sign step is never differentiated: say so loudly
        out.sum().backward()


@kernel_only
def test_compiles_without_graph_break():
    from scc.kernels import sign_step as ss

    delta, grad, x, _ = inputs(3, 9, 16, torch.float32)
    fn = torch.compile(lambda d, g: ss.sign_step(ss.sign_step(d, g, x, ALPHA, EPS), -g, x, ALPHA, EPS),
                       fullgraph=True, dynamic=False)
    ref = ss.sign_step_ref(ss.sign_step_ref(delta, grad, x, ALPHA, EPS), -grad, x, ALPHA, EPS)
    check_close(fn(delta, grad), ref, 2e-6, 1e-5, "two compiled steps")


@kernel_only
def test_kill_switch_and_guards(monkeypatch):
    from scc.kernels import sign_step as ss

    delta, grad, x, _ = inputs(1, 5, 7, torch.float32)
    monkeypatch.setenv("SCC_TRITON_STEP", "0")
    assert ss.status(DEVICE) == "reference (SCC_TRITON_STEP=0)"
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


@pytest.mark.skipif(DEVICE is not None, reason="the kernels run in this process")
def test_under_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__)

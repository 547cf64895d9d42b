"""scc.grad: input_grad's two routes give the same gradients; the route switch is local to a `with` block."""
from __future__ import annotations

import threading

import pytest
import torch

import scc
from scc.grad import current_route, grad_route, input_grad
from scc.defenses.ttc import TTCConfig, counterattack


@pytest.fixture(autouse=True)
def _threads():  # overrides conftest's: one thread (a shared 2-core machine)
    torch.set_num_threads(1)
    yield


def loss(d, w):
    return (torch.tanh(d @ w) ** 2).sum()


def loss_aux(d, w):
    y = torch.tanh(d @ w)
    return (y ** 2).sum(), (y, {"y2": 2 * y})


def test_default_route_is_torch_func_grad():
    d, w = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert current_route() == "func"
    assert torch.equal(input_grad(loss)(d, w), torch.func.grad(loss)(d, w))
    g, (y, meta) = input_grad(loss_aux, has_aux=True)(d, w)
    g_ref, (y_ref, _) = torch.func.grad(loss_aux, has_aux=True)(d, w)
    assert torch.equal(g, g_ref) and torch.equal(y, y_ref) and torch.equal(meta["y2"], 2 * y_ref)


def test_autograd_route_same_gradient_and_detached_aux():
    d, w = torch.randn(4, 5), torch.randn(5, 3)
    with torch.no_grad(), grad_route("autograd"):
        assert current_route() == "autograd"
        g = input_grad(loss)(d, w)
        g_aux, (y, meta) = input_grad(loss_aux, has_aux=True)(d, w)
    assert current_route() == "func"
    ref = torch.func.grad(loss)(d, w)
    torch.testing.assert_close(g, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_aux, ref, rtol=0, atol=0)
    assert not y.requires_grad and not meta["y2"].requires_grad
    assert not d.requires_grad  # the caller's tensor is untouched


def test_routes_agree_on_the_ttc_counterattack(tiny):
    """The two routes on the real procedure: identical per-step gradient signs and perturbation."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = TTCConfig()
    trace_func, trace_autograd = [], []
    with torch.no_grad():
        delta_func, tau_func = counterattack(tiny, x, cfg, start, trace_func)
        with grad_route("autograd"):
            delta_autograd, tau_autograd = counterattack(tiny, x, cfg, start, trace_autograd)
    assert len(trace_func) == len(trace_autograd) == cfg.steps
    for a, b in zip(trace_func, trace_autograd):
        assert torch.equal(a, b)
    torch.testing.assert_close(delta_autograd, delta_func, rtol=0, atol=1e-7)
    torch.testing.assert_close(tau_autograd, tau_func, rtol=0, atol=1e-7)


def test_route_is_local_nested_and_per_thread():
    seen = {}
    with grad_route("autograd"):
        with grad_route("func"):
            seen["inner"] = current_route()
        seen["outer"] = current_route()
        thread = threading.Thread(target=lambda: seen.__setitem__("thread", current_route()))
        thread.start()
        thread.join()
    assert seen == {"inner": "func", "outer": "autograd", "thread": "func"}  # a new thread starts at the default
    with pytest.raises(RuntimeError):
        with grad_route("autograd"):
            raise RuntimeError("boom")
    assert current_route() == "func"  # restored after an exception


def test_bad_route_and_outer_gradient_are_errors():
    with pytest.raises(scc.SccError, match=r"unknown gradient route 'jvp'.*'func'.*'autograd'"):
        with grad_route("jvp"):
            pass
    d = torch.randn(2, 5, requires_grad=True)
    with grad_route("autograd"), pytest.raises(scc.SccError, match="cannot be differentiated through"):
        input_grad(loss)(d * 1.0, torch.randn(5, 3))
    with grad_route("autograd"), pytest.raises(scc.SccError, match=r"scalar loss, got \(2, 3\)"):
        input_grad(lambda d: d @ torch.ones(5, 3))(torch.randn(2, 5))


def test_func_route_is_differentiable_through():
    """The default route composes with an outer backward (adaptive attacks differentiate through a defense): the
    derivative of the input gradient, with respect to the input and to the other arguments, is the numerical one,
    and so is the derivative after that (float64 finite differences)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(input_grad(loss), (x, w))
    assert torch.autograd.gradgradcheck(input_grad(loss), (x, w))


@pytest.mark.compile
def test_compiled_takes_the_func_route_in_one_graph():
    """Under torch.compile(fullgraph=True) input_grad is torch.func.grad, even inside grad_route('autograd')."""
    torch._dynamo.reset()

    def step(d, w):
        return d + 0.1 * input_grad(loss)(d, w).sign()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    d, w = torch.randn(4, 5), torch.randn(5, 3)
    with grad_route("autograd"):
        out = compiled(d, w)
    torch.testing.assert_close(out, step(d, w))

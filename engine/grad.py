"""`input_grad(fn)`: the gradient of a scalar loss with respect to its first argument, on a chosen route.

    g = input_grad(loss)(d, *args)                          loss(d, *args) -> scalar
    g, aux = input_grad(loss, has_aux=True)(d, *args)       loss(d, *args) -> (scalar, aux)

g has the shape of d. Two routes compute the same gradient (bit-identical in eager on CPU, checked in
tests/test_grad.py):

    "func"      torch.func.grad (the default). Composable: torch.compile traces it into one graph
                (torch.autograd.grad graph-breaks there), and an outer .backward() differentiates through it.
    "autograd"  torch.autograd.grad on `d.detach().requires_grad_()` under torch.enable_grad(). make_fx keeps
                a symbolic batch dimension through it (torch.func.grad specialises the batch to the example's),
                which is what the ONNX exporter needs for a batch-dynamic file. The gradient is taken for that
                detached copy: it is not differentiable with respect to anything outside `fn` (an error says
                so when an outer gradient is being recorded).

The route is chosen locally, never by a process-wide switch: `with grad_route("autograd"): ...` sets a
`contextvars.ContextVar` for the code inside the block only (other threads and asyncio tasks keep their own
value), and `input_grad` reads it when the returned function is called. Under torch.compile the route is
always "func".
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree

from .models import SccError

ROUTES = ("func", "autograd")
_ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("scc_grad_route", default="func")


@contextlib.contextmanager
def grad_route(route: str) -> Iterator[None]:
    """Inside the block, `input_grad` functions use `route` ("func" | "autograd"); restored on exit."""
    if route not in ROUTES:
        raise SccError(f"unknown gradient route {route!r}; choose 'func' (torch.func.grad) or 'autograd' "
                       "(torch.autograd.grad)")
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


def current_route() -> str:
    """The route `input_grad` takes here: "func" under torch.compile, else the innermost `grad_route`."""
    if torch.compiler.is_compiling():
        return "func"
    return _ROUTE.get()


def input_grad(fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """A function computing d fn(x, *args) / dx (and fn's aux output with `has_aux`); see the module docstring.

    fn(x, *args, **kwargs) must return a scalar tensor, or (scalar, aux) with has_aux=True. The aux output is
    returned detached from the gradient computation on both routes (as torch.func.grad does).
    """
    func_grad = torch.func.grad(fn, has_aux=has_aux)

    def autograd_grad(x: torch.Tensor, *args, **kwargs):
        if torch.is_grad_enabled() and x.requires_grad:
            raise SccError("the 'autograd' gradient route detaches its input and cannot be differentiated "
                           "through; leave grad_route('autograd') (used for ONNX export only) to attack the "
                           "defense itself")
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            out = fn(leaf, *args, **kwargs)
            loss, aux = out if has_aux else (out, None)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise SccError(f"input_grad needs a scalar loss, got "
                               f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            (grad,) = torch.autograd.grad(loss, leaf)
        if not has_aux:
            return grad
        return grad, _pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, aux)

    def grad(x: torch.Tensor, *args, **kwargs):
        if current_route() == "autograd":
            return autograd_grad(x, *args, **kwargs)
        return func_grad(x, *args, **kwargs)

    return grad

"""Triton path: scc.compiled.Engine(backend="triton") (hand-written kernels), compiled before timing."""
import pytest

pytest.importorskip("scc.compiled", reason="backend triton is not available")


def test_triton(measure):
    measure("triton")

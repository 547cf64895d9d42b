"""Triton path: scc.compiled.Engine(backend="triton") (hand-written kernels), compiled before timing."""
import pytest

try:
    from scc.compiled import Engine  # noqa: F401
except ImportError as err:
    pytest.skip(f"backend triton is not available: cannot import scc.compiled.Engine ({err})",
                allow_module_level=True)


def test_triton(measure):
    measure("triton")

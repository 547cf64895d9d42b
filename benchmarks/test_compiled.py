"""torch.compile path: scc.compiled.Engine(backend="compiled"), compiled per batch size before timing."""
import pytest

try:
    from scc.compiled import Engine  # noqa: F401
except ImportError as err:
    pytest.skip(f"backend compiled is not available: cannot import scc.compiled.Engine ({err})",
                allow_module_level=True)


def test_compiled(measure):
    measure("compiled")

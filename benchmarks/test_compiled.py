"""torch.compile path: scc.compiled.Engine(backend="compiled"), compiled per batch size before timing."""
import pytest

pytest.importorskip("scc.compiled", reason="backend compiled is not available")


def test_compiled(measure):
    measure("compiled")

"""ONNX Runtime path: scc.export.export_onnx (draws as inputs) + scc.export.OrtDefended; export time apart."""
import pytest

try:
    from scc.export import OrtDefended, export_onnx  # noqa: F401
except ImportError as err:
    pytest.skip(f"backend onnx is not available: cannot import scc.export.export_onnx/OrtDefended ({err})",
                allow_module_level=True)


def test_onnx(measure):
    measure("onnx")

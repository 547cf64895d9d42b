"""ONNX Runtime path: scc.export.export_onnx (draws as inputs) + scc.export.OrtDefended; export time apart."""
import pytest

pytest.importorskip("scc.export", reason="backend onnx is not available")


def test_onnx(measure):
    measure("onnx")

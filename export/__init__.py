"""Export a defended classifier to ONNX and run it with ONNX Runtime.

    from scc.export import export_onnx, OrtDefended
    info = export_onnx(scc.defend(clf, "scc", preset="latency"), "scc.onnx", batch_size=8)
    logits = OrtDefended("scc.onnx")(pixels)

Command line: `scc export onnx --model NAME --defense ttc|scc --out FILE.onnx` (see `scc.export.cli`).
"""
from .onnx import export_onnx
from .runtime import OrtDefended

__all__ = ["export_onnx", "OrtDefended"]

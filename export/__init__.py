"""Export a defended classifier to ONNX and run it with ONNX Runtime; write a Triton model repository.

    from scc.export import export_onnx, OrtDefended
    info = export_onnx(scc.defend(clf, "scc", preset="latency"), "scc.onnx")   # batch-dynamic file
    logits = OrtDefended("scc.onnx")(pixels)

    from scc.export import export_triton
    export_triton(scc.defend(clf, "scc", preset="latency"), "repo", max_batch=8)

Command line: `scc export onnx|triton --model NAME --defense ttc|scc --out ...` (scc.cli.export).
The runtime layer: imports the algorithm and foundation layers, never scc.backends (which imports it).
"""
from .onnx import export_onnx
from .runtime import OrtDefended
from .triton import export_triton

__all__ = ["export_onnx", "export_triton", "OrtDefended"]

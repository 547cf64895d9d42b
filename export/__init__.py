"""Export a defended classifier to ONNX and run it with ONNX Runtime; write a Triton Inference Server model
repository.

    from scc.export import export_onnx, OrtDefended
    info = export_onnx(scc.defend(clf, "scc", preset="latency"), "scc.onnx")   # batch-dynamic file
    logits = OrtDefended("scc.onnx")(pixels)

    from scc.export import export_triton_server
    export_triton_server(scc.defend(clf, "scc", preset="latency"), "repo", max_batch=8)

Command line: `scc export onnx|triton-server --model NAME --defense ttc|scc --out ...` (scc.cli.export).
The runtime layer: imports the algorithm and foundation layers, never scc.backends (which imports it).
"""
from .onnx import export_onnx
from .runtime import OrtDefended
from .triton_server import export_triton, export_triton_server

__all__ = ["export_onnx", "export_triton_server", "OrtDefended",
           "export_triton"]  # a deprecated alias of export_triton_server, kept for one release

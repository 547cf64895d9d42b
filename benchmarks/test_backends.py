"""Per-image latency of every (model, defense, backend) case that conftest.py generates: eager PyTorch (the
reference), scc.backends.compiled.Engine (compiled, and triton with the hand kernels), and ONNX Runtime (export time
apart). Each case records top-1 agreement with eager on the same draws and, on the bundled model, accuracy."""


def test_latency(measure):
    measure()

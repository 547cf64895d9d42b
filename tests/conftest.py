import os
import subprocess
import sys

import pytest
import torch

import scc
from scc.data import load_dataset


@pytest.fixture(scope="session")
def tiny():
    """The bundled scc-tiny-digits zero-shot classifier (CPU, frozen)."""
    return scc.load("scc-tiny-digits")


@pytest.fixture(scope="session")
def digits():
    """The 450 held-out digits (never used for training): (images (N,3,32,32) in [0,1], targets)."""
    ds = load_dataset("digits", 32)
    return ds.images, ds.targets


@pytest.fixture(scope="session")
def onnx_dynamic(tiny, tmp_path_factory):
    """(defended, export info) of the default suite's one ONNX export of the tiny architecture: SCC-latency (which
    runs TTC's warm-up too), batch-dynamic, draws as inputs, one output per sign step. Tests that need another file
    of this architecture reuse it (a CLI wiring test copies it) or are marked slow: an export costs 20-60 s here."""
    pytest.importorskip("onnxruntime")
    from scc.export import export_onnx

    torch.set_num_threads(1)
    defended = scc.defend(tiny, "scc", preset="latency", seed=0)
    path = tmp_path_factory.mktemp("onnx") / "scc-latency-dynamic.onnx"
    progress = []
    info = export_onnx(defended, path, draws_as_inputs=True, trace_outputs=True, progress=progress.append)
    return defended, {**info, "progress_lines": progress}


@pytest.fixture(autouse=True)
def _threads():
    """One intra-op thread: on a 2-core machine shared with other work, a second OpenMP thread that gets
    descheduled stalls every parallel region (measured 4-180x slower); the tiny models gain nothing from it."""
    torch.set_num_threads(1)
    yield


# Triton kernels run on CPU tensors only under triton's interpreter, which triton picks when a kernel module is
# imported (TRITON_INTERPRET=1 must be set before). Setting it in this process would turn every later Triton use
# in the session into the slow interpreter, so on a CPU-only machine the kernel tests re-run themselves in a
# fresh process that has it from the start: rerun_under_interpreter(["tests/test_x.py", "tests/test_y.py::test_z"]).


@pytest.fixture
def rerun_under_interpreter():
    def run(nodes: list[str], timeout: int = 900) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCC_TRITON_")}  # no kill switch
        env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "not under_interpreter",
               *nodes]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        report = proc.stdout[-8000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, f"`TRITON_INTERPRET=1 {' '.join(cmd[1:])}` failed:\n{report}"
        assert "skipped" not in proc.stdout, f"kernel tests were skipped under the interpreter:\n{report}"
    return run

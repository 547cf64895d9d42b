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
    if KERNEL_DEVICE is not None:
        pytest.skip(f"the kernel tests run in this process (on {KERNEL_DEVICE})")

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


@pytest.fixture
def requires_native_bf16():
    """For a test that assumes bf16 is fast on this CPU (@pytest.mark.usefixtures("requires_native_bf16")): it skips,
    with the reason, on a CPU without native bf16 matmuls, where bf16 runs ~30x slower than fp32."""
    if not scc.provenance.native_bf16():
        pytest.skip(f"needs native bf16 matmuls: this CPU ({scc.provenance.cpu_name()}) has no avx512_bf16/amx_bf16 "
                    "and runs bf16 ~30x slower than fp32")


@pytest.fixture
def cpu_without_native_bf16(monkeypatch):
    """This process sees an AVX2-only CPU (scc.provenance.cpu_flags patched), with no bf16 warning printed yet."""
    monkeypatch.setattr(scc.provenance, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.delenv("SCC_BF16_WARNED", raising=False)


# The Triton kernel tests run where a kernel really executes: on CUDA, or on the CPU in a process that interprets
# Triton from its start (TRITON_INTERPRET=1). Elsewhere they skip, and tests/test_kernels_interpreted.py re-runs them
# in such a process.
KERNEL_DEVICE = ("cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else
                 "cuda" if torch.cuda.is_available() else None)


@pytest.fixture
def kernel_device():
    """The device a Triton kernel test runs on ("cuda", or "cpu" under the interpreter); it skips where none runs."""
    if KERNEL_DEVICE is None:
        pytest.skip("no GPU and no TRITON_INTERPRET=1: see tests/test_kernels_interpreted.py")
    return KERNEL_DEVICE


@pytest.fixture(params=[torch.float32] + ([pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
                                           if KERNEL_DEVICE == "cuda" else []),
                ids=lambda dtype: str(dtype).removeprefix("torch."))
def kernel_dtype(request):
    """Each dtype a kernel is checked in: fp32, and bf16 on CUDA (the interpreter runs fp32 only)."""
    return request.param


@pytest.fixture
def kernel_close():
    """assert_close of a kernel's output against its reference, naming the case and the worst element."""
    def check(actual, expected, atol, rtol, what):
        torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what}: {m}\nshape {tuple(actual.shape)}, worst at flat index "
                                                 f"{(actual.float() - expected.float()).abs().argmax().item()}")
    return check


def pytest_runtest_setup(item):
    """A test marked gpu needs CUDA: it skips, saying so, where there is none."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs CUDA (marked gpu)")

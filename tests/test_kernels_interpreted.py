"""The Triton kernels on a CPU-only machine: every kernel test (tests/test_sign_step.py, tests/test_view_augment.py)
and the compiled engine with the kernels inside its graph, re-run in ONE fresh process under TRITON_INTERPRET=1
(one interpreter start for all of them). On a GPU, or when this process already interprets, they run in place."""
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.compile  # two of the kernel tests and the kernels-in-graph engine test compile
def test_kernels_under_interpreter(rerun_under_interpreter):  # skips where the kernel tests run in this process
    rerun_under_interpreter([str(HERE / "test_sign_step.py"), str(HERE / "test_view_augment.py"),
                             f"{HERE / 'test_compiled.py'}::test_triton_backend_runs_kernels_in_graph"])

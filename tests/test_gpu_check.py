"""benchmarks/gpu_check.py on the CPU: its plan, its row runner under a deadline, and one short run of the
whole check that yields every section of the JSON while a failing step and failing rows leave the rest running."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_prints_every_row_and_what_540_s_reach_and_runs_nothing(gpu_check, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--plan"]) == 0
    text = capsys.readouterr().out
    assert "ViT-B-32" in text and "within 540 s" in text
    rows = [parts for parts in map(str.split, text.splitlines()) if len(parts) > 2 and parts[1] in gpu_check.STEPS]
    assert len(rows) == len(gpu_check.plan(gpu_check.parse_args([])))
    assert {r[1] for r in rows} == set(gpu_check.STEPS)
    fitting = [r for r in rows if r[-1] == "yes"]
    assert 0 < len(fitting) < len(rows)  # the budget reaches the first rows, not every compile
    assert rows[0][-1] == "yes" and float(fitting[-1][-2]) <= 540
    assert f"{len(fitting)} of {len(rows)} rows fit in 540 s" in text and "skipped by the budget: compiled" in text
    assert list(tmp_path.iterdir()) == []  # --plan writes nothing


def test_unknown_names_are_refused_with_the_choices(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--defenses", "ttc,nope"])
    assert "unknown ['nope']; choose from ttc,scc-latency,scc,rtpt" in capsys.readouterr().err


def test_rows_past_the_budget_or_a_broken_context_are_skipped_and_the_rest_runs(gpu_check, tmp_path, capsys):
    Row = gpu_check.Row

    def ok(check):
        return {"ran": True}

    def bad(check):
        raise ValueError("bad value 7: expected 3")

    rows = [Row("env", "first", 0, ok, gpu=False), Row("eager_b1", "raises", 0, bad, gpu=False),
            Row("kernels", "too long", 10_000, ok, gpu=False), Row("kernel_tests", "gpu row", 0, ok),
            Row("onnx", "cheap", 1, ok, gpu=False)]
    args = gpu_check.parse_args(["--device", "cpu", "--deadline-s", "60", "--reserve-s", "0"])
    check = gpu_check.Check(args, rows, tmp_path / "report.json")
    check.cuda_broken = "an earlier row (AcceleratorError: an illegal memory access)"
    check.run()
    report = json.loads((tmp_path / "report.json").read_text())
    status = {r["row"]: r for r in report["rows"]}
    assert [r["row"] for r in report["rows"]] == ["first", "raises", "too long", "gpu row", "cheap"]
    assert status["first"]["status"] == "ok" and status["first"]["ran"]
    assert status["raises"]["status"] == "error" and status["raises"]["error"] == "ValueError: bad value 7: expected 3"
    assert "in bad" in status["raises"]["traceback"]
    assert status["too long"]["status"] == "skipped" and status["too long"]["reason"].startswith("deadline:")
    assert status["gpu row"]["status"] == "skipped" and "CUDA context is broken" in status["gpu row"]["reason"]
    assert status["cheap"]["status"] == "ok"
    assert report["finished"] and report["steps"]["eager_b1"]["status"] == "partial"
    assert report["steps"]["compiled_b1"]["status"] == "not selected"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "raises: error" in lines[1]  # one printed line per row


def test_summary_stays_within_what_comes_back(gpu_check):
    rows = [{"step": "eager_b1", "row": f"row {i}", "status": "error", "error": "RuntimeError: " + "x" * 400}
            for i in range(400)]
    report = {"deadline_s": 540, "rows": rows, "steps": {"eager_b1": {"status": "partial"}}, "finished": True}
    text = gpu_check.summary(report)
    assert len(text) <= 12_000 and text.endswith("the JSON has every row)")


@pytest.mark.compile  # one compiled row (~20 s of the ~35 s)
def test_cpu_smoke_yields_every_section_and_failures_do_not_stop_it(gpu_check, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--vit", "tiny", "--defenses", "ttc,rtpt",
           "--dtypes", "fp32", "--calls", "2", "--deadline-s", "150", "--tests-timeout-s", "60",
           "--kernel-tests", "tests/test_sign_step.py::test_nan_gradient_takes_no_step",
           "--fail-at", "env,eager ttc fp32 b1,onnx-cpu ttc fp32 b1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: the planted errors
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-check.json"]  # atomic writes leave no temporary file
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["finished"] and report["deadline_s"] == 150

    # every step has its section: a final status and at least one row
    assert list(report["steps"]) == list(gpu_check.STEPS)
    for step, info in report["steps"].items():
        assert info["status"] in ("ok", "partial", "skipped"), (step, info)
        assert any(r["step"] == step for r in report["rows"]), step
    rows = {r["row"]: r for r in report["rows"]}

    # a failing step (env: its three rows), a failing row and a failing last step: each recorded with its
    # traceback, and everything after them ran
    for name in ("env", "limits", "model", "eager ttc fp32 b1", "onnx-cpu ttc fp32 b1"):
        assert rows[name]["status"] == "error" and "planted failure" in rows[name]["traceback"], rows[name]
    rtpt = rows["eager rtpt fp32 b1"]  # builds the model itself after the env step failed
    assert rtpt["status"] == "ok" and rtpt["ms_per_image"] > 0 and rtpt["top1_agreement"] == 1.0
    assert report["model"]["name"] == "scc-tiny-digits"
    tests = rows["kernel tests"]
    assert tests["status"] == "ok" and tests["counts"] == {"passed": 1}, tests
    assert rows["kernel sign_step b1"]["status"] == "skipped" and "CUDA" in rows["kernel sign_step b1"]["reason"]
    compiled = rows["compiled ttc fp32 b1"]
    assert compiled["status"] == "ok" and compiled["compile_s"] > 0, compiled
    assert compiled["cuda_graph"] == {"captured": False,
                                      "reason": "CUDA graphs need a CUDA device, this row ran on cpu"}
    assert compiled["inductor_cudagraph_skips"] == 0
    assert rows["eager ttc fp32 b64"]["status"] == "ok" and rows["eager ttc fp32 b64"]["batch"] == 64
    assert rows["scc_paper_compiled"]["status"] == "skipped"  # --defenses leave it no row
    assert rows["onnx"]["status"] == "skipped" and rows["onnx"]["reason"]

    # the summary is printed last, fits the 12,000 characters that come back, and is in the JSON
    summary = report["summary"]
    assert proc.stdout.rstrip().endswith(summary.rstrip()) and len(summary) <= 12_000
    assert "Table 4" in summary and "rtpt" in summary and "planted failure" in summary

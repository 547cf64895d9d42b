"""Interrupted long commands keep what finished (scc.cli.interrupts); `scc loadtest` meets a server that is not
there or not ready with one line, and titles its plot with what it knows.

Each interrupt test starts a real run in its own process group, waits until the run's own output (a progress bar,
a status line, or the report file it rewrites) shows that work has finished, then sends SIGINT to the whole group
(as Ctrl-C in a terminal does, worker processes included) or SIGTERM to the command alone (as `kill` does), and
reads what the run left: exit 130, no traceback, one line `scc: interrupted; N of M UNIT saved to PATH`, and a
report marked partial whose rows are the N that finished."""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scc.cli import main
from scc.serve.process import free_port

LINE = re.compile(r"^scc: interrupted; (\d+) of (\d+) (\w+) saved to (.+)$")


class Run:
    """`python -m scc.cli ARGV` in its own process group (one torch thread), output in files to poll."""

    def __init__(self, argv: list[str], folder: Path):
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "scc.cli", *argv], stdout=out, stderr=err,
                                         cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                         start_new_session=True)

    def text(self, which: str = "err") -> str:
        return (self.err if which == "err" else self.out).read_text(errors="replace")

    def wait_for(self, ready, timeout: float = 120.0) -> None:
        """Poll until ready() (what the run has written shows finished work); fail if the run ends first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before it could be interrupted:\n"
                            + self.text()[-2000:])
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("no finished work seen in time:\n" + self.text()[-2000:])
            time.sleep(0.05)

    def interrupt(self, sig: int, group: bool, line: re.Pattern = LINE) -> tuple:
        """Send `sig`; after the common checks, the groups of the one interrupt line: (done, total, unit,
        places) for LINE."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        code = self.proc.wait(90)
        err = self.text()
        assert code == 130, err[-3000:]
        assert "Traceback" not in err and "Exception" not in err and "Warning" not in err, err[-3000:]
        lines = [seg for seg in re.split(r"[\r\n]", err) if "interrupted" in seg]
        assert len(lines) == 1 and line.match(lines[0]), lines
        with pytest.raises(ProcessLookupError):  # nothing of the run is left: workers stopped with it
            for _ in range(50):
                os.killpg(self.proc.pid, 0)
                time.sleep(0.1)
        if line is not LINE:
            return line.match(lines[0]).groups()
        done, total, unit, places = LINE.match(lines[0]).groups()
        return int(done), int(total), unit, places.split(", ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def bar_count(err: str, desc: str) -> int:
    """The highest count of the tqdm bar `desc` in the output so far (finished jobs)."""
    counts = [int(m) for m in re.findall(re.escape(desc) + r"[^\r\n|]*\|[^|]*\|\s*(\d+)/\d+", err)]
    return max(counts, default=0)


def read_partial(path: Path, unit: str, done: int, total: int) -> dict:
    report = json.loads(path.read_text())
    assert report["partial"] is True
    assert report["finished"] == {"done": done, "total": total, "unit": unit}
    assert len(report["missing"]) >= 1 and 0 <= done < total
    return report


def test_paper_eval_ctrl_c_keeps_the_finished_rows(tmp_path):
    run = Run(["eval", "--defenses", "none,ttc,scc,rtpt", "--images", "300", "--threads", "1",
               "--json", "int.json", "--out", "intout"], tmp_path)
    run.wait_for(lambda: "ttc on none" in run.text())  # the first row (none, clean) is done
    done, total, unit, places = run.interrupt(signal.SIGINT, group=True)
    assert (unit, total, places) == ("rows", 8, ["int.json", "intout/"]) and done >= 1
    report = read_partial(tmp_path / "int.json", "rows", done, total)
    assert len(report["results"]) == done and len(report["missing"]) == total - done
    assert report["results"][0]["defense"] == "none" and report["results"][0]["attack"] == "none"
    assert json.loads((tmp_path / "intout" / "report.json").read_text()) == report
    assert "Partial: interrupted after" in (tmp_path / "intout" / "report.md").read_text()
    assert (tmp_path / "intout" / "acc_vs_eps.png").stat().st_size > 0
    assert "clean" in run.text("out")  # the partial table is printed too


ADAPTIVE = ["eval", "--protocol", "adaptive", "--defenses", "none", "--attacks", "pgd", "--eps", "4/255",
            "--images", "200", "--batch-size", "8", "--threads", "1", "--json", "r.json", "--out", "out"]
JOBS_PER_BATCH = 2  # paper-pgd on the classifier, pgd through the defense


def test_adaptive_eval_sigterm_keeps_the_finished_batches(tmp_path):
    run = Run(ADAPTIVE + ["--workers", "1"], tmp_path)
    # a job of the second batch finished: the first batch (8 images) is complete
    run.wait_for(lambda: bar_count(run.text(), "adaptive eval") > JOBS_PER_BATCH)
    done, total, unit, places = run.interrupt(signal.SIGTERM, group=False)
    assert (unit, total, places) == ("images", 200, ["r.json", "out/"]) and done >= 8 and done % 8 == 0
    report = read_partial(tmp_path / "r.json", "images", done, total)
    assert report["n_images"] == done and report["missing"] == [f"images {done}-199"]
    assert {r["n"] for r in report["results"]} == {done}
    assert {r["attack"] for r in report["results"]} == {"none", "pgd", "worst"}
    err = run.text()
    assert err.index("estimated cost") < err.index("adaptive eval")  # the estimate comes before the work


def test_adaptive_eval_workers_stop_on_ctrl_c(tmp_path):
    run = Run(ADAPTIVE + ["--workers", "2"], tmp_path)
    # a worker counts a batch's jobs, then checks its first images (sanity), then returns it: more finished jobs
    # than two workers can count without starting a second batch means at least one batch is complete
    run.wait_for(lambda: bar_count(run.text(), "adaptive eval (2 workers)") > 2 * JOBS_PER_BATCH)
    done, total, unit, places = run.interrupt(signal.SIGINT, group=True)
    assert (unit, total) == ("images", 200) and done >= 8 and done % 8 == 0
    report = read_partial(tmp_path / "r.json", "images", done, total)
    assert {r["n"] for r in report["results"]} == {done} and report["workers"] == 2


def test_bench_sigterm_keeps_the_measured_rows(tmp_path):
    run = Run(["bench", "--images", "8", "--repeats", "3", "--defenses", "none,ttc,scc,rtpt", "--threads", "1",
               "--json", "bench.json"], tmp_path)
    run.wait_for(lambda: (tmp_path / "bench.json").exists())  # rewritten after each defense
    done, total, unit, places = run.interrupt(signal.SIGTERM, group=False)
    assert (unit, total, places) == ("rows", 5, ["bench.json"]) and done >= 1
    report = read_partial(tmp_path / "bench.json", "rows", done, total)
    assert len(report["rows"]) == done and report["rows"][0]["spec"] == "none"
    assert "ttc eager fp32 batch 1" in report["missing"] or done > 1


@pytest.mark.slow
def test_export_ctrl_c_says_the_file_is_not_written(tmp_path):
    run = Run(["export", "onnx", "--model", "scc-tiny-digits", "--defense", "scc-latency", "--out", "x.onnx",
               "--threads", "1"], tmp_path)
    run.wait_for(lambda: "export: tracing" in run.text())
    run.interrupt(signal.SIGINT, group=True, line=re.compile(
        r"^scc: interrupted; 0 of 1 files finished, none saved \(the export did not finish; x\.onnx may be "
        r"incomplete: run the export again\)$"))


# ----------------------------------------------------------------------------------------------------------
# A stand-in service for the load test's client side: stdlib HTTP on 127.0.0.1, the three endpoints it uses
# ----------------------------------------------------------------------------------------------------------
INFO = {"model": "scc-tiny-digits", "defense": "none", "spec": "none", "backend": "eager", "dtype": "fp32",
        "max_batch": 8, "threads": 1, "device": "cpu", "draws": "fresh", "limits": {"max_images": 16}}


class Stub:
    """GET /readyz answers 503 until `ready_after` seconds have passed, then 200; GET /v1/info and POST
    /v1/classify (one result per request, 20 ms) answer like scc serve."""

    def __init__(self, ready_after: float = 0.0):
        started = time.monotonic()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/readyz"):
                    ready = time.monotonic() - started >= ready_after
                    self.answer(200 if ready else 503, {"status": "ready" if ready else "not ready"})
                else:
                    self.answer(200, INFO)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(0.02)
                self.answer(200, {"results": [{"label": "0", "batch_size": 1}]})

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_loadtest_ctrl_c_keeps_the_finished_levels(tmp_path):
    with Stub() as stub:
        run = Run(["loadtest", "--url", stub.url, "--concurrency", "1,2,4", "--requests", "100000",
                   "--max-time-s", "3", "--no-in-process", "--json", "load.json"], tmp_path)
        run.wait_for(lambda: "c=  1" in run.text("out"))  # the first level's line
        done, total, unit, places = run.interrupt(signal.SIGINT, group=True)
    assert (unit, total, places) == ("levels", 3, ["load.json", "load.png"]) and done >= 1
    report = read_partial(tmp_path / "load.json", "levels", done, total)
    assert [r["concurrency"] for r in report["levels"]] == [1, 2, 4][:done]
    assert report["missing"][-1] == "concurrency 4" and report["levels"][0]["ok"] > 0
    assert (tmp_path / "load.png").stat().st_size > 0


def test_loadtest_without_a_server_is_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["loadtest", "--url", url, "--no-in-process"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and url in err and "connection refused" in err
    assert "scc serve" in err and "--wait-s" in err


def test_loadtest_not_ready_is_one_line_and_wait_s_waits(tmp_path, capsys):
    with Stub(ready_after=3600) as stub:
        started = time.monotonic()
        assert main(["loadtest", "--url", stub.url, "--wait-s", "0.6", "--no-in-process"]) == 2
        waited = time.monotonic() - started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not ready" in err and "503" in err and "after waiting 0.6 s" in err
    assert waited >= 0.6
    with Stub(ready_after=0.8) as stub:  # ready while the client waits: the load test runs
        out = tmp_path / "load.json"
        assert main(["loadtest", "--url", stub.url, "--wait-s", "30", "--concurrency", "1", "--requests", "3",
                     "--no-in-process", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "partial" not in report and report["levels"][0]["ok"] == 3


def test_loadtest_plot_title_names_replicas_only_when_known():
    from scc.serve.loadtest import plot_title

    report = {"service": {"model": "scc-tiny-digits", "defense": "scc", "spec": "scc-latency", "backend": "eager"},
              "replicas": None, "levels": [{"images_per_request": 1, "transport": "http"}]}
    assert plot_title(report) == "scc serve: scc-tiny-digits scc-latency eager, 1 image(s)/request, http"
    assert "x2 replicas," in plot_title({**report, "replicas": 2})

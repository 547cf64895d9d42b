"""Smoke tests of `scc bench` (scc.bench.latency, scc.cli.bench) and of the pytest-benchmark suite in benchmarks/."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scc.backends import make_runner
from scc.bench.latency import format_table
from scc.cli import main as cli_main
from scc.errors import SccError
from scc.timing import percentile, summarize

ROOT = Path(__file__).resolve().parents[1]
def main(argv):
    return cli_main(["bench", *argv])


ROW_KEYS = {"defense", "preset", "spec", "backend", "s_per_image", "p20", "p80", "compile_s", "warmup_s",
            "top1_agreement"}


def test_bench_main_writes_the_json_schema(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--images", "2", "--batch-size", "1,2", "--defenses", "none,ttc,scc-latency,scc,rtpt",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"hardware", "versions", "model", "batch_size", "batch_sizes", "n_images", "rows"} <= set(report)
    assert report["load_average_at_start"] >= 0  # taken before the model loads
    assert {"cpu", "cpu_cores"} <= set(report["hardware"]) and {"torch", "open_clip"} <= set(report["versions"])
    assert (report["model"], report["batch_sizes"], report["n_images"]) == ("scc-tiny-digits", [1, 2], 2)
    # the official TTC procedure rides with the TTC rows of every batch size
    want = [("none", "paper"), ("ttc", "official"), ("ttc", "paper"), ("scc", "latency"), ("scc", "paper"),
            ("rtpt", "paper")]
    assert [(r["defense"], r["preset"], r["batch_size"]) for r in report["rows"]] == \
        [(d, p, b) for b in (1, 2) for d, p in want]
    for row in report["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["backend"] == "eager" and row["compile_s"] is None
        assert 0 < row["p20"] <= row["s_per_image"] <= row["p80"]
        assert row["speedup_vs_official"] == pytest.approx(
            next(o["s_per_image"] for o in report["rows"]
                 if o["spec"] == "ttc-official" and o["batch_size"] == row["batch_size"]) / row["s_per_image"])
        if row["spec"] == "ttc-official":  # the engine's TTC gives the official procedure's answers
            assert row["top1_agreement"] == 1.0
        else:  # eager fp32 is the reference the other backends are compared with: no agreement with itself
            assert row["top1_agreement"] is None
    table = capsys.readouterr().out
    assert "x TTC" in table and "R-TPT/x" in table and "0.37" in table and "R-TPT/SCC" in table
    assert "x off." in table and "batch 2 eager fp32: R-TPT/SCC" in table


def test_a_run_cut_short_leaves_the_rows_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten (marked partial) after each defense of each batch size, so a crash late in a long
    run keeps every finished row; the finished run's file carries no mark."""
    import scc.bench.latency as latency

    out = tmp_path / "bench.json"
    real, seen = latency._measure_batch, []

    def fail_on_batch_2(*args, **kw):
        if args[3] == 2:  # batch size
            seen.append(json.loads(out.read_text()))
            raise RuntimeError("killed")
        return real(*args, **kw)

    monkeypatch.setattr(latency, "_measure_batch", fail_on_batch_2)
    with pytest.raises(RuntimeError):
        main(["--images", "2", "--batch-size", "1,2", "--defenses", "none,ttc", "--json", str(out)])
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and seen == [partial] and partial["limits"]["matmul_peak_gflops"]["fp32"] > 0
    assert [(r["spec"], r["batch_size"]) for r in partial["rows"]] == [("none", 1), ("ttc-official", 1), ("ttc", 1)]
    monkeypatch.setattr(latency, "_measure_batch", real)
    assert main(["--images", "2", "--batch-size", "1,2", "--defenses", "none", "--json", str(out)]) == 0
    done = json.loads(out.read_text())
    assert "partial" not in done and len(done["rows"]) == 2


def test_batch_sizes_must_divide_the_images(capsys):
    assert main(["--images", "4", "--batch-size", "1,3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every --batch-size (3 is not a divisor); e.g. --images 3" in err, err
    assert main(["--batch-size", "1,0"]) == 2
    assert "must be a positive integer, got '0'" in capsys.readouterr().err


def test_unknown_backend_and_defense_are_clear_errors(capsys):
    for argv, message in ((["--backends", "eager,tensorrt"], "unknown backend.*tensorrt.*eager, compiled, triton, onnx"),
                          (["--defenses", "ttc,foo,bar"], r"unknown defense\(s\) \['foo', 'bar'\]")):
        assert main(argv) == 2  # one line, exit 2, before any model loads
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("scc: error: ") and re.search(message, err), err


def test_benchmark_suite_generates_only_supported_pairs():
    """R-TPT cannot compile or export (its Defense record): those cases are never generated, so a crash of a
    supported pair is a failure, not a skip."""
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_backends.py", "--collect-only", "-q",
           "--bench-defenses", "ttc,rtpt"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = sorted(l.split("[", 1)[1].rstrip("]") for l in proc.stdout.splitlines() if "::test_latency[" in l)
    assert ids == sorted(["scc-tiny-digits-ttc-eager", "scc-tiny-digits-ttc-compiled", "scc-tiny-digits-ttc-triton",
                          "scc-tiny-digits-ttc-onnx", "scc-tiny-digits-rtpt-eager"]), ids


def test_missing_backend_module_says_so(tiny, monkeypatch):
    import scc

    monkeypatch.setitem(sys.modules, "scc.backends.compiled", None)  # import scc.backends.compiled -> ImportError
    with pytest.raises(SccError, match="backend compiled is not available"):
        make_runner(scc.defend(tiny, "ttc"), "compiled", 1)
    with pytest.raises(SccError, match="unknown backend"):
        make_runner(scc.defend(tiny, "ttc"), "tensorrt", 1)


def test_explain_counts_match_spec_section_5(tmp_path, capsys):
    out = tmp_path / "explain.json"
    table1 = "anti-adv,anti-adv-ttc-budget,hd,hd-ttc-budget,doc,dbd,agc"
    assert main(["--explain", "--defenses", f"none,ttc,scc,scc-latency,rtpt,{table1}", "--json", str(out)]) == 0
    rows = {r["spec"]: r for r in json.loads(out.read_text())["explain"]}
    # spec section 5: image fwd, image bwd, text fwd, text bwd, sequential rounds per image
    want = {"none": (1, 0, 0, 0, 1), "ttc": (4, 2, 0, 0, 4), "scc": (19, 14, 0, 0, 7),
            "scc-latency": (10, 5, 0, 0, 4), "rtpt": (64, 0, 2, 1, 3),
            # Table 1's peers: K+1 / K (anti-adv), T / T-1 (hd), M+T+2 / T (doc), one round of views (dbd, agc)
            "anti-adv": (3, 2, 0, 0, 3), "anti-adv-ttc-budget": (3, 2, 0, 0, 3), "hd": (20, 19, 0, 0, 20),
            "hd-ttc-budget": (2, 1, 0, 0, 2), "doc": (11, 4, 0, 0, 6), "dbd": (32, 0, 0, 0, 1),
            "agc": (33, 0, 0, 0, 1)}
    for name, counts in want.items():
        m = rows[name]["measured"]
        got = (m["image_forwards"], m["image_backwards"], m["text_forwards"], m["text_backwards"], m["rounds"])
        assert got == counts, name
        assert rows[name]["match"] is True
    assert "MISMATCH" not in capsys.readouterr().out


def test_table_ratios():
    rows = [{"defense": d, "preset": "paper", "backend": "eager", "s_per_image": t, "p20": t, "p80": t,
             "compile_s": None, "top1_agreement": 1.0} for d, t in (("ttc", 0.01), ("scc", 0.02), ("rtpt", 0.3))]
    table = format_table({"model": "m", "batch_size": 1, "n_images": 1, "rows": rows})
    scc_line = next(l for l in table.splitlines() if l.startswith("scc "))
    assert "2.00" in scc_line and "15.00" in scc_line  # x TTC, R-TPT/x
    assert "R-TPT/SCC 15.00 (paper 29.6), SCC/TTC 2.00 (paper 1.04)" in table
    assert percentile([1, 2, 3, 4, 5], 0.2) == pytest.approx(1.8)
    assert summarize([2.0, 4.0, 6.0, 8.0, 10.0], per=2) == {"median": 3.0, "p20": pytest.approx(1.8),
                                                            "p80": pytest.approx(4.2), "calls": 5}


def test_benchmark_suite_runs_and_its_json_prints(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_backends.py", "-q", "--bench-backends", "eager",
           "--bench-images", "2", "--bench-defenses", "none,ttc,rtpt", "--bench-acc-images", "4",
           f"--benchmark-json={out}", "-p", "no:xdist"]  # pytest-benchmark switches itself off under xdist
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    assert sorted(i["spec"] for i in infos) == ["none", "rtpt", "ttc"]
    for b in data["benchmarks"]:
        assert b["group"] == "scc-tiny-digits"
        info = b["extra_info"]
        assert {"hardware", "versions", "warmup_s", "compile_s", "p20", "p80"} <= set(info)
        assert info["hardware"]["torch_threads"] >= 1 and info["top1_agreement"] is None  # eager: the reference
        assert info["acc_images"] == 4 and info["robust_acc"] <= info["clean_acc"] + 0.25
        if info["spec"] == "none":  # the undefended model is right on the first four held-out digits
            assert info["clean_acc"] == 1.0
    assert main(["--from-benchmark-json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "rtpt" in table and "ttc" in table and "R-TPT/x" in table


def test_operator_profile_splits_matmuls_from_the_rest():
    """scc.bench.profile: the profiled call's self time is split into matmuls, attention and the rest."""
    import torch

    from scc.bench.profile import format_profile, is_matmul, operator_profile

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    report = operator_profile(lambda: (a @ b).relu().sum(), calls=2)
    names = [r["op"] for r in report["top"]]
    assert "aten::mm" in names and "aten::relu" in names, names
    assert 0 < report["matmul_s"] <= report["operator_self_s"] and report["attention_s"] == 0
    assert 0 < report["matmul_share"] < 1 and report["outside_matmul_share"] == pytest.approx(1 - report["matmul_share"])
    assert is_matmul("mkldnn::_linear_pointwise") and is_matmul("cpp_CppMicroGemmAMX_1") and not is_matmul("aten::gelu")
    assert format_profile("x", report).startswith("x: ")


def test_release_frees_runners_and_resets_dynamo_after_compiled_ones(monkeypatch):
    """Between defenses the bench drops its runners; after compiled ones it also resets torch._dynamo, whose cache
    would otherwise keep every compiled graph (with its frozen weights) alive until the process ends."""
    from types import SimpleNamespace

    import torch

    from scc.bench.latency import release

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    eager = [SimpleNamespace(backend="eager")]
    release(eager)
    assert eager == [] and resets == []
    mixed = [SimpleNamespace(backend="eager"), SimpleNamespace(backend="compiled")]
    release(mixed)
    assert mixed == [] and resets == [1]


@pytest.mark.compile
def test_release_frees_the_frozen_weights_of_a_compiled_runner(tiny, digits, tmp_path, monkeypatch):
    """A real compiled runner (Inductor freezing on): after `release`, no tensor its graph modules held as constants
    is alive. Dynamo's reset alone left them in Inductor's module cache (the bench was OOM-killed at 24 GB)."""
    import gc
    import weakref

    import torch
    from torch._inductor.codecache import PyCodeCache

    import scc
    from scc.bench.latency import release

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    defended = scc.defend(tiny, "ttc", seed=0)
    x = digits[0][:1]
    before = {id(mod) for mod in PyCodeCache.modules}  # graph modules of earlier tests are not this test's business
    runner = make_runner(defended, "compiled", 1)
    with torch.no_grad():
        runner(x, defended.draws(x))
    callers = {t.untyped_storage().data_ptr() for t in [*tiny.parameters(), *tiny.buffers()]}

    def own_copy(t):  # not the caller's weights (the fixture keeps those alive); packed weights have no storage
        try:
            return t.untyped_storage().data_ptr() not in callers
        except NotImplementedError:  # an MKL / oneDNN packed weight (opaque tensor)
            return True

    held = [weakref.ref(v) for mod in PyCodeCache.modules if id(mod) not in before for v in vars(mod).values()
            if isinstance(v, torch.Tensor) and own_copy(v)]
    assert held, "the compiled graph holds no constants of its own: freezing did not run, the test checks nothing"
    runners = [runner]
    del runner
    release(runners)
    gc.collect()
    alive = [r() for r in held if r() is not None]
    assert not alive, f"{len(alive)} of {len(held)} frozen constants outlived release: " + \
        ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in alive[:5])


def test_batch_bench_rows_are_what_benchmark_returns(tiny, digits, monkeypatch):
    """With the clock and the machine's limits fixed, one defense's BatchBench gives exactly the rows `benchmark`
    returns for that defense; benchmark adds only the speed-up columns, measured across rows."""
    import copy

    import torch

    import scc.bench.latency as latency
    from scc.bench.latency import BatchBench, Settings, batches_of, benchmark

    limits = {"matmul_peak_gflops": {"fp32": 100.0, "bf16": 200.0}, "memory_gbps": None}
    monkeypatch.setattr(latency, "machine_limits", lambda dtypes, device: copy.deepcopy(limits))
    monkeypatch.setattr(latency, "timed_call", lambda fn, device="cpu": (0.01, fn()))
    monkeypatch.setattr(latency, "warm_up", lambda fn, device="cpu", calls=1: 0.5)
    x, dtypes = digits[0][:4], [torch.float32, torch.bfloat16]
    rows, skipped, _ = benchmark(tiny, x, ["none", "ttc"], ["eager"], dtypes, batch_size=2)
    bench = BatchBench.build(tiny, "ttc", batches_of(x, 2), Settings(["eager"], dtypes, limits=limits), [])
    bench.time()
    own = bench.rows()
    assert [(r["spec"], r["dtype"]) for r in own] == [("ttc-official", "fp32"), ("ttc", "fp32"), ("ttc", "bf16")]
    assert [{k: r[k] for k in own[0]} for r in rows if r["defense"] == "ttc"] == own
    assert {k for r in rows for k in r} - set(own[0]) == {"speedup_vs_fp32", "speedup_vs_official"}
    assert own[0]["top1_agreement"] == 1.0 and own[1]["top1_agreement"] is None and own[0]["s_per_image"] == 0.005
    assert skipped == bench.skipped == []

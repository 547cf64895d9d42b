"""One meaning and one spelling per name: the names of the previous release still work for one release (each
warns once), and the committed results files follow one naming scheme."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import scc
from scc.cli import build_parser, main
from scc.errors import SccError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("scc: warning:")]


def test_defense_spec_names_and_their_old_spellings(tiny):
    from scc.backends import Runner
    from scc.defenses import (defense_labels, defense_specs, label_of, spec_of, split_label, split_spec)

    defended = scc.defend(tiny, "scc-latency:steps=2", seed=0)
    assert (defended.defense, defended.spec) == ("scc", "scc-latency:steps=2")
    assert split_spec(defended.spec) == ("scc", "latency:steps=2") and spec_of("ttc", "paper") == "ttc"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names never warn
        assert "scc-latency" in defense_specs() and defended.spec
    old = [(lambda: defended.label, "scc-latency:steps=2"), (lambda: split_label("scc-latency"), ("scc", "latency")),
           (lambda: label_of("scc", "latency"), "scc-latency"), (lambda: defense_labels(), defense_specs())]
    for call, expected in old:
        with pytest.warns(DeprecationWarning, match="is deprecated; use") as caught:
            assert call() == expected
        assert len(caught) == 1
    runner = Runner(backend="eager", spec="ttc", batch_size=1, dtype=torch.float32, device=torch.device("cpu"),
                    run=lambda x, draws=None: x)
    with pytest.warns(DeprecationWarning, match=r"Runner\(defense=\.\.\.\) is deprecated"):
        old_runner = Runner(backend="eager", defense="ttc", batch_size=1, dtype=torch.float32,
                            device=torch.device("cpu"), run=lambda x, draws=None: x)
    with pytest.warns(DeprecationWarning, match="Runner.defense is deprecated; use Runner.spec"):
        assert old_runner.spec == runner.spec == old_runner.defense == "ttc"


def test_loadtest_old_flags_still_work_and_warn_once(capsys):
    parse = build_parser().parse_args
    new = parse(["loadtest", "--image-source", "pngs", "--transport", "grpc", "--max-time-s", "5",
                 "--duration-s", "60"])
    assert warning_lines(capsys.readouterr().err) == []
    old = parse(["loadtest", "--images", "pngs", "--protocol", "grpc", "--max-seconds", "5", "--duration", "60"])
    assert warning_lines(capsys.readouterr().err) == [
        f"scc: warning: --{o} is deprecated; use --{n}" for o, n in (
            ("images", "image-source"), ("protocol", "transport"), ("max-seconds", "max-time-s"),
            ("duration", "duration-s"))]
    for key in ("image_source", "transport", "max_time_s", "duration_s"):
        assert getattr(old, key) == getattr(new, key), key
    with pytest.raises(SccError, match="invalid choice"):  # the old flag checks its value as the new one does
        parse(["loadtest", "--protocol", "paper"])
    assert main(["loadtest", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--image-source" in shown and "--max-seconds" not in shown and "--protocol" not in shown


def test_loadtest_old_keywords_still_work(monkeypatch):
    from scc.serve import loadtest as lt

    def stop(target, wait_s):  # the keywords are mapped before the server is asked anything
        raise SccError("stop here")

    monkeypatch.setattr(lt, "check_ready", stop)
    with pytest.warns(DeprecationWarning, match=r"loadtest\(protocol=\.\.\.\) is deprecated; use transport="):
        with pytest.raises(SccError, match="stop here"):
            lt.loadtest(lt.Target("http://127.0.0.1:9"), protocol="grpc")
    with pytest.raises(TypeError, match="unexpected keyword argument 'protocl'"):
        lt.loadtest(lt.Target("http://127.0.0.1:9"), protocl="grpc")


def test_old_extras_are_aliases_of_the_new_ones():
    import tomllib

    from scc.errors import install_hint, require_extra

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["plots"] == ["matplotlib"] and extras["adaptive"] == ["scc-defense[plots]"]
    assert extras["triton"] == ["scc-defense[triton-server]"] and "tritonclient" in extras["triton-server"][0]
    require_extra("adaptive", ["sys"])  # an old extra name still names the same modules
    with pytest.raises(SccError, match=re.escape("pip install 'scc-defense[plots]'")):
        require_extra("adaptive", ["no_such_module_here"])
    assert "triton-server" in install_hint("triton-server")


def test_results_files_follow_one_naming_scheme():
    """Lowercase words joined by hyphens, `<area>-<subject>[-<model>][-<variant>]`, a model spelt vitb32 or
    scc-tiny-digits (never ViT-B-32), named after its area and subject, not first."""
    from scc.bench.report import RESULT_NAME, model_slug

    assert model_slug("ViT-B-32") == "vitb32" and model_slug("scc-tiny-digits") == "scc-tiny-digits"
    models = ("vitb32", "scc-tiny-digits", "scc-tiny-fashion")
    bad = []
    for path in sorted(RESULTS.rglob("*")):
        rel = path.relative_to(RESULTS)
        if rel.name == "README.md" or (path.is_file() and path.suffix not in (".json", ".png")):
            continue  # the rendered page, logs, the Markdown beside a report
        if path.is_file() and path.name in ("report.json", "acc_vs_eps.png", "acc_vs_steps.png"):
            continue  # a report folder's own files: the folder carries the name
        stem = path.stem if path.is_file() else path.name
        area = stem.split("-")[0]
        if not RESULT_NAME.fullmatch(stem) or any(stem.startswith(f"{area}-{m}") for m in models):
            bad.append(rel.as_posix())
    assert not bad, f"results files outside the naming scheme: {bad}"
    assert RESULT_NAME.fullmatch("serve-load-8img-http") and not RESULT_NAME.fullmatch("serve_load_8img_http")


@pytest.mark.parametrize("script, old, new, value", [
    ("cpu_matmul_shapes.py", "--seconds", "--window-s", "0.1"), ("serve_faults.py", "--kill-at", "--kill-at-s", "2"),
    ("serve_faults.py", "--after", "--after-s", "5"), ("serve_load.py", "--soak-seconds", "--soak-s", "60")])
def test_benchmark_scripts_old_time_flags(script, old, new, value):
    """The benchmark scripts' time flags end in -s; the old spelling still parses (one warning) and is not shown."""
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), old, value, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert warning_lines(proc.stderr) == [f"scc: warning: {old} is deprecated; use {new}"]
    assert new in proc.stdout and f"{old} " not in proc.stdout

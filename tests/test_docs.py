"""The documentation: no development history in the product, the site builds with --strict, and the results pages
match the JSON they are rendered from (and a changed JSON value is caught)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXT = {".py", ".md", ".txt", ".yml", ".yaml", ".toml", ".cfg", ".json", ".sh", ".html", ".css", ".js"}

# Words about how the project was developed rather than what it does. Each pattern is written so that this file's
# own source does not match it (character classes and alternations split the words).
DEVELOPMENT = [re.compile(p, re.IGNORECASE) for p in (
    r"\bissues?[ ]?#?[0-9]+",                                              # a tracker item by number
    r"(?<![\w/&])#[0-9]{1,6}\b",                                           # ... or by hash (links are fine)
    r"\bthe issue'?s\b",
    r"\b(this|that|previous|earlier|last|later|another|other|next)\s+sess[i]ons?\b",
    r"\bsess[i]ons'",
    r"\block[ ]?files?\b", r"\bf[l]ock\b", r"scc-cpu\.l[o]ck",
    r"\b(previous|earlier|last)\s+ru[n]s?\b",
    r"\b(previous|earlier)\s+measureme[n]ts?\b",
    r"\bclos[i]ng note\b", r"\blab note[b]ook\b", r"\bdia[r]y\b", r"\bSIGS[T]OP\b", r"\bgit arc[h]ive\b",
    r"\bl[e]nt\b",                                                         # a machine on loan
)]


def product_files():
    yield ROOT / "README.md"
    for tree in ("docs", "engine", "export", "kernels", "tests"):
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and path.suffix in TEXT and "__pycache__" not in path.parts:
                yield path
    yield from sorted((ROOT / "benchmarks").glob("*.py"))


def test_no_development_history_in_the_product():
    hits = []
    for path in product_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(p.search(line) for p in DEVELOPMENT):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "development history in the product (say what the code does, not how it came about):\n" \
        + "\n".join(hits)


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("scc.models.load") > 0  # generated reference
    assert (tmp_path / "site" / "results" / "files" / "serve-soak.png").exists()  # plots travel with their pages


def report(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "scc.bench.report", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_committed_results_pages_match_their_json():
    run = report(RESULTS, "--check")
    assert run.returncode == 0, "stale results pages; run `python -m scc.bench.report benchmarks/results`:\n" \
        + run.stderr


def test_a_changed_json_value_makes_its_page_stale(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(RESULTS, results)
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results")
    assert report(results, "--check").returncode == 0  # the copy renders as committed

    faults = results / "serve-faults.json"
    data = json.loads(faults.read_text())
    data["runs"][0]["requests"] += 1
    faults.write_text(json.dumps(data))
    run = report(results, "--check")
    assert run.returncode == 1
    stale = {Path(line.split()[1]).name for line in run.stderr.splitlines() if line.startswith("stale:")}
    assert stale == {"serving.md", "README.md"}, run.stderr  # its family's page and the folder's README

    assert report(results).returncode == 0 and report(results, "--check").returncode == 0  # rendering fixes it
    assert str(data["runs"][0]["requests"]) in (tmp_path / "docs" / "results" / "serving.md").read_text()


def test_a_file_of_unknown_layout_still_gets_a_section(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(RESULTS, results)
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results")
    (results / "new-kind.json").write_text(json.dumps({"what": "a new measurement", "threads": 3,
                                                       "rows": [{"case": "a", "wall_s": 0.25}]}))
    run = report(results, "--check")
    assert run.returncode == 1 and "other.md" in run.stderr, run.stderr
    assert report(results).returncode == 0
    page = (tmp_path / "docs" / "results" / "other.md").read_text()
    assert "### new-kind" in page and "a new measurement" in page and "| a | 0.25 |" in page

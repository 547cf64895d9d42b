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
    for name in ("README.md", "CHANGELOG.md", "pyproject.toml", "mkdocs.yml", ".ci/run"):
        yield ROOT / name
    yield from sorted((ROOT / "benchmarks").glob("*.sh"))
    yield from sorted((ROOT / "benchmarks" / "results").rglob("*.md"))
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


def copy_tree(tmp_path) -> Path:
    """benchmarks/results, docs/results and README.md copied to tmp_path: the renderer's whole world."""
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(RESULTS, results)
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return results


def test_a_changed_json_value_makes_its_page_stale(tmp_path):
    results = copy_tree(tmp_path)
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


def test_a_changed_headline_value_makes_the_readme_stale(tmp_path):
    results = copy_tree(tmp_path)
    demo = next(results.glob("demo-*.json"))
    data = json.loads(demo.read_text())
    row = next(r for r in data["results"] if r["defense"] == "scc" and r["attack"] == "pgd" and r["eps"] > 3 / 255)
    row["accuracy"] = 0.123
    demo.write_text(json.dumps(data))
    run = report(results, "--check")
    stale = {str(Path(line.split()[1]).relative_to(tmp_path)) for line in run.stderr.splitlines()
             if line.startswith("stale:")}
    assert run.returncode == 1 and "README.md" in stale, run.stderr  # the repository's README, not only the folder's
    assert report(results).returncode == 0 and "12.3" in (tmp_path / "README.md").read_text()


def test_a_readme_without_its_markers_is_refused(tmp_path):
    results = copy_tree(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("<!-- results:begin -->", ""))
    run = report(results, "--check")
    assert run.returncode == 2 and "results:begin" in run.stderr and "Traceback" not in run.stderr, run.stderr
    readme.unlink()
    run = report(results, "--check")
    assert run.returncode == 2 and "does not exist" in run.stderr, run.stderr


def test_a_file_of_unknown_layout_still_gets_a_section(tmp_path):
    results = copy_tree(tmp_path)
    (results / "new-kind.json").write_text(json.dumps({"what": "a new measurement", "threads": 3,
                                                       "rows": [{"case": "a", "wall_s": 0.25}]}))
    run = report(results, "--check")
    assert run.returncode == 1 and "other.md" in run.stderr, run.stderr
    assert report(results).returncode == 0
    page = (tmp_path / "docs" / "results" / "other.md").read_text()
    assert "### new-kind" in page and "a new measurement" in page and "| a | 0.25 |" in page


def test_ci_runs_the_readmes_test_command_and_stops_on_any_lane():
    """.ci/run holds the README's test command verbatim, and a failure anywhere in that `&&` chain fails CI (under
    `set -e` bash carries on after a failure before the last `&&`, so the script must check the status itself)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("# 2. run the tests", 1)[1].split("```", 1)[0]
    command = block.split("\n", 1)[1].strip()
    assert command.startswith("python3 -m venv .venv") and "pytest" in command, command
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci, "the README's test command is not in .ci/run verbatim"
    after = ci.split(command, 1)[1].lstrip("\n").splitlines()
    assert after[0].startswith("status=$?") and after[1].startswith('[ "$status" = 0 ] || exit'), after[:2]

"""MkDocs hooks for the scc site.

- The API reference: the import package `scc` lives in engine/, with scc.export in export/ and scc.kernels in
  kernels/ (pyproject's package-dir). Griffe reads packages from folders named after them, so the build makes a
  folder `scc` of links to those three and points mkdocstrings at it.
- The results pages (rendered by `python -m scc.bench.report`) show the plots and link the JSON committed in
  benchmarks/results/: each of those files is served as results/files/<its path under benchmarks/results>.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SERVED = "results/files"


def _package_view() -> str:
    """A temporary folder holding `scc/`: links to engine/'s entries, plus export/ and kernels/."""
    top = Path(tempfile.mkdtemp(prefix="scc-docs-api-"))
    atexit.register(shutil.rmtree, top, ignore_errors=True)
    pkg = top / "scc"
    pkg.mkdir()
    for entry in (ROOT / "engine").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, pkg / entry.name)
    os.symlink(ROOT / "export", pkg / "export")
    os.symlink(ROOT / "kernels", pkg / "kernels")
    return str(top)


@event_priority(100)  # before mkdocstrings, which starts its handlers in its own on_config
def on_config(config, **kwargs):
    handlers = config.plugins["mkdocstrings"].config.handlers
    handlers.setdefault("python", {})["paths"] = [_package_view()]
    return config


def on_files(files, config, **kwargs):
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix in (".png", ".json"):
            uri = f"{SERVED}/{path.relative_to(RESULTS).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files

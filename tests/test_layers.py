"""The layering rule of engine/__init__.py: a module imports only its own layer and the layers below it, and the
package's modules import one another without a cycle.

    foundation      the flat modules of scc (engine/*.py)
    algorithms      scc.defenses, scc.attacks
    runtime         scc.kernels, scc.export, scc.backends
    applications    scc.eval, scc.bench, scc.serve, scc.train
    command line    scc.cli

Every import is read with `ast`, inside functions too (a lazy import is still a dependency). `from scc import X`
and `scc.X` after `import scc` count as importing the module that the package's lazy table (_EXPORTS in
engine/__init__.py) loads X from. A failure names file:line of each offending import.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "scc"
LAYERS = ["foundation", "algorithms", "runtime", "applications", "command line"]
SUBPACKAGE_LAYERS = {
    "defenses": "algorithms", "attacks": "algorithms",
    "kernels": "runtime", "export": "runtime", "backends": "runtime",
    "eval": "applications", "bench": "applications", "serve": "applications", "train": "applications",
    "cli": "command line",
}


def package_dirs() -> dict[str, Path]:
    """Import name -> source folder, as pyproject.toml's package-dir maps them."""
    found = re.search(r"package-dir\s*=\s*\{([^}]*)\}", (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml has no package-dir table"
    dirs = {name: ROOT / folder for name, folder in re.findall(r'"([\w.]+)"\s*=\s*"([\w./-]+)"', found.group(1))}
    assert PACKAGE in dirs, dirs
    return dirs


def find_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    modules: dict[str, Path] = {}
    dirs = package_dirs()
    for pkg, folder in sorted(dirs.items(), key=lambda kv: -kv[0].count(".")):  # a mapped sub-package wins
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if any(p.startswith(".") or p == "__pycache__" for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.setdefault(".".join([pkg, *parts]), path)
    return modules


MODULES = find_modules()


def layer_of(module: str) -> str | None:
    """The layer of a module of the package; None for the package itself (its facade: see lazy_exports)."""
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    if len(parts) == 1:
        return None
    if parts[1] in SUBPACKAGE_LAYERS:
        return SUBPACKAGE_LAYERS[parts[1]]
    if len(parts) == 2 and MODULES[module].name != "__init__.py":
        return "foundation"
    raise AssertionError(f"{MODULES[module].relative_to(ROOT)}: sub-package scc.{parts[1]} has no layer: add it to "
                         "the layer list in engine/__init__.py's docstring and to SUBPACKAGE_LAYERS here")


def lazy_exports() -> dict[str, str]:
    """The package's lazy names -> the module each is loaded from (engine/__init__.py's _EXPORTS)."""
    tree = ast.parse(MODULES[PACKAGE].read_text())
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            table = ast.literal_eval(node.value)
            return {name: f"{PACKAGE}.{module}" for name, module in table.items()}
    return {}


EXPORTS = lazy_exports()


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    line: int

    def where(self) -> str:
        return f"{MODULES[self.source].relative_to(ROOT)}:{self.line}"


def longest_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def resolve_name(base: str, name: str) -> str | None:
    """The module that `from base import name` depends on: base.name when that is a module, else the module
    that defines the lazy name (from the package), else base itself."""
    if f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    if base == PACKAGE and name in EXPORTS:
        return EXPORTS[name]
    return longest_module(base)


def attribute_chain(node: ast.AST) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(names)]
    return None


def imports_of(module: str) -> list[Edge]:
    """Every dependency of `module` on another module of the package, with the line of the import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges, binds_package = [], False
    for node in ast.walk(tree):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    targets.append(longest_module(alias.name))
                    binds_package |= alias.asname is None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                assert up, f"{path.relative_to(ROOT)}:{node.lineno}: relative import above the package"
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == PACKAGE:
                targets += [resolve_name(base, alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call) and (attribute_chain(node.func) or [""])[-1] == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == PACKAGE):
            targets.append(longest_module(node.args[0].value))
        edges += [Edge(module, t, node.lineno) for t in targets if t and t != module]
    if binds_package:  # `import scc`: its attributes scc.X / scc.sub.mod are dependencies too
        for node in ast.walk(tree):
            chain = attribute_chain(node) if isinstance(node, ast.Attribute) else None
            if chain and chain[0] == PACKAGE and len(chain) > 1:
                target = resolve_name(PACKAGE, chain[1])
                deeper = longest_module(".".join(chain))
                target = deeper if deeper and deeper != PACKAGE else target
                if target and target != module:
                    edges.append(Edge(module, target, node.lineno))
    return edges


def all_edges() -> list[Edge]:
    return sorted({e for m in MODULES for e in imports_of(m)}, key=lambda e: (e.source, e.line, e.target))


def upward(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is None or dst is None:  # the package facade itself: its lazy names are resolved above
            continue
        if LAYERS.index(dst) > LAYERS.index(src):
            bad.append(f"{e.where()}: {e.source} ({src}) imports {e.target} ({dst})")
    return bad


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative). A module's import of its own
    parent package is left out: importing a module runs its parent's __init__ first anyway."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges:
        if not e.source.startswith(e.target + "."):
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe_cycle(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    lines = [f"  {e.where()}: {e.source} imports {e.target}" for e in edges
             if e.source in inside and e.target in inside and not e.source.startswith(e.target + ".")]
    return "import cycle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def test_the_scan_sees_the_package():
    """The scan finds every layer's modules and their imports (a scan that saw nothing would pass anything)."""
    layers = {layer_of(m) for m in MODULES if m != PACKAGE}
    assert layers == set(LAYERS), layers
    assert {"scc.images", "scc.models", "scc.defenses.scc", "scc.kernels.sign_step", "scc.cli.demo"} <= set(MODULES)
    edges = all_edges()
    pairs = {(e.source, e.target) for e in edges}
    assert ("scc.kernels.sign_step", "scc.perturbation") in pairs  # from .. import perturbation (another folder)
    assert ("scc.cli.args", PACKAGE) in pairs  # from .. import __version__, inside a function
    assert len(edges) > 100, len(edges)


def test_lower_layers_never_import_higher_ones():
    bad = upward(all_edges())
    assert not bad, "upward imports (a module imports only its own layer and the ones below):\n" + "\n".join(bad)


def test_no_import_cycle():
    edges = all_edges()
    found = cycles(edges)
    assert not found, "\n".join(describe_cycle(c, edges) for c in found)


@pytest.mark.parametrize("source, code, message", [
    ("scc.models", "def f():\n    from .eval import paper\n", "scc.models (foundation) imports scc.eval.paper"),
    ("scc.defenses.ttc", "import scc.serve.app\n", "scc.defenses.ttc (algorithms) imports scc.serve.app"),
    ("scc.data", "from scc import Engine\n", "scc.data (foundation) imports scc.backends.compiled"),
    ("scc.grad", "import scc\nscc.cli.main\n", "scc.grad (foundation) imports scc.cli"),
    ("scc.kernels.sign_step", "from ..eval import suite\n", "scc.kernels.sign_step (runtime) imports scc.eval.suite"),
])
def test_an_upward_import_is_named_with_its_line(monkeypatch, tmp_path, source, code, message):
    """The check itself can fail: a planted upward import (module level, in a function, lazy) is reported at
    file:line."""
    planted = tmp_path / MODULES[source].name
    planted.write_text("# planted\n" + code)
    monkeypatch.setitem(MODULES, source, planted)
    monkeypatch.setattr(Edge, "where", lambda e: f"{MODULES[e.source].name}:{e.line}")
    bad = upward(imports_of(source))
    assert any(message in b for b in bad), bad
    assert all(b.startswith(f"{planted.name}:2: ") or b.startswith(f"{planted.name}:3: ") for b in bad), bad


def test_a_cycle_is_named_with_its_lines(monkeypatch, tmp_path):
    """A planted pair (the registry imports views at module level, views imports the registry inside a function) is
    a cycle, and the report names both files' lines."""
    registry, views = tmp_path / "registry.py", tmp_path / "views.py"
    registry.write_text("from .views import parse_views\n")
    views.write_text("import torch\n\n\ndef f():\n    from .registry import DEFENSES\n")
    monkeypatch.setitem(MODULES, "scc.defenses.registry", registry)
    monkeypatch.setitem(MODULES, "scc.defenses.views", views)
    monkeypatch.setattr(Edge, "where", lambda e: f"{MODULES[e.source].name}:{e.line}")
    edges = all_edges()
    found = cycles(edges)
    assert ["scc.defenses.registry", "scc.defenses.views"] in found, found
    text = describe_cycle(["scc.defenses.registry", "scc.defenses.views"], edges)
    assert "registry.py:1: scc.defenses.registry imports scc.defenses.views" in text, text
    assert "views.py:5: scc.defenses.views imports scc.defenses.registry" in text, text

"""The one user-error type, and the optional extras a command may need (found before any work starts).

    raise SccError("--eps 4: ambiguous; write 4/255")          # the CLI prints it as one `scc: error:` line
    require_extra("plots", what="scc eval --out")               # SccError naming the missing modules and the extra

Every layer imports this module; it imports nothing of scc.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence


class SccError(ValueError):
    """A user error: bad input, unknown model, missing weights or extra. The CLI prints its message on one line."""


# extra -> the top-level modules it installs that scc imports (pyproject [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "serve": ("ray", "fastapi", "matplotlib"),
    "plots": ("matplotlib",),
    "ray": ("ray",),
    "triton-server": ("tritonclient",),
}
# extras under their names of the previous release (pyproject keeps them as aliases for one release)
EXTRA_ALIASES = {"adaptive": "plots", "triton": "triton-server"}


def install_hint(extra: str) -> str:
    """The pip command for an optional extra, both for an installed wheel and for a source checkout."""
    return (f"install the extra: pip install 'scc-defense[{extra}]' (from a source checkout: "
            f"pip install -e '.[{extra}]')")


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The top-level modules of `modules` that cannot be imported here (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]


def require_extra(extra: str, modules: Sequence[str] | None = None, what: str = "this") -> None:
    """SccError, before any work, when a module of the optional `extra` (default: all of them) is missing."""
    extra = EXTRA_ALIASES.get(extra, extra)
    missing = missing_modules(EXTRAS[extra] if modules is None else modules)
    if missing:
        raise SccError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                       f"installed; {install_hint(extra)}")

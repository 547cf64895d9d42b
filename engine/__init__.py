"""scc: a compiled inference engine for test-time adversarial defenses of CLIP (SCC, TTC, R-TPT).

    import scc
    clf = scc.load("scc-tiny-digits")                 # or scc.load("ViT-B-32", pretrained="openai", labels=[...])
    defended = scc.defend(clf, "scc", preset="paper")  # nn.Module: [0,1] NCHW pixels -> logits

Layers (a module imports only its own layer and the ones below it, without cycles; tests/test_layers.py checks it):
    foundation    errors, validation, batching, attention, perturbation, grad, draws, passes, timing, provenance,
                  metrics, images, models, precision, data                  (flat modules of scc)
    algorithms    scc.defenses (TTC, SCC, R-TPT, the Defense records), scc.attacks
    runtime       scc.kernels (Triton), scc.export (ONNX, Triton repository), scc.backends (make_runner, compiled)
    applications  scc.eval, scc.bench, scc.serve, scc.train
    command line  scc.cli

The names below are loaded on first use, so `import scc` (and `scc --help`) stays light.
"""
from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "SccError": "errors", "ZeroShotClassifier": "models", "load": "models",
    "Defended": "defenses", "Defense": "defenses", "defend": "defenses", "make_config": "defenses",
    "DEFENSES": "defenses", "PRESETS": "defenses", "TTCConfig": "defenses.ttc", "SCCConfig": "defenses.scc",
    "Engine": "backends.compiled",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a subpackage or module: scc.models, scc.eval, ...
    raise AttributeError(f"module 'scc' has no attribute {name!r}")

"""scc: a compiled inference engine for test-time adversarial defenses of CLIP (SCC, TTC, R-TPT).

    import scc
    clf = scc.load("scc-tiny-digits")                 # or scc.load("ViT-B-32", pretrained="openai", labels=[...])
    defended = scc.defend(clf, "scc", preset="paper")  # nn.Module: [0,1] NCHW pixels -> logits
"""
from .models import SccError, ZeroShotClassifier, load
from .defenses import DEFENSES, PRESETS, Defended, Defense, defend, make_config
from .ttc import TTCConfig
from .scc_defense import SCCConfig

__version__ = "0.1.0"
__all__ = ["SccError", "ZeroShotClassifier", "load", "Defended", "Defense", "defend", "make_config", "DEFENSES",
           "PRESETS", "TTCConfig", "SCCConfig", "__version__"]


def __getattr__(name):  # lazy: the compiled engine imports inductor/triton only when asked for
    if name == "Engine":
        from .compiled import Engine

        return Engine
    raise AttributeError(f"module 'scc' has no attribute {name!r}")

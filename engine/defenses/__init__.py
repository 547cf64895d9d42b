"""The algorithm layer: test-time defenses, each one readable file with its equations as the docstring.

    ttc.py       TTC, the official test-time counterattack (CVPR 2025)
    scc.py       SCC, self-calibrated consistency (ICML 2026): TTC warm-up, views, soft prototype, corrective steps
    rtpt.py      R-TPT, robust test-time prompt tuning (CVPR 2025)
    views.py     SCC's label-preserving views (flip, zoom, noise) as differentiable, exportable ops
    registry.py  the `Defense` records (config, procedure, draws, presets, expected passes), name parsing
    defended.py  `Defended` (the nn.Module every backend wraps) and `defend`

Imports only the foundation modules (scc.models, scc.draws, scc.grad, scc.perturbation, ...).
"""
from .defended import Defended, defend
from .registry import (DEFENSES, MODEL_PRESETS, PASS_KEYS, PRESETS, Defense, defense_labels, expected_passes,
                       label_of, make_config, parse_defense, parse_defenses, split_label)

__all__ = ["Defended", "defend", "DEFENSES", "MODEL_PRESETS", "PASS_KEYS", "PRESETS", "Defense", "defense_labels",
           "expected_passes", "label_of", "make_config", "parse_defense", "parse_defenses", "split_label"]

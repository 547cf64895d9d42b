"""The algorithm layer: test-time defenses, each one readable file with its equations as the docstring.

    ttc.py       TTC, the official test-time counterattack (CVPR 2025)
    scc.py       SCC, self-calibrated consistency (ICML 2026): TTC warm-up, views, soft prototype, corrective steps
    rtpt.py      R-TPT, robust test-time prompt tuning (CVPR 2025)
    anti_adv.py  Anti-adv, anti-adversaries (AAAI 2022): descent steps toward the model's own prediction
    hd.py        HD, hedge defense (2021): ascent steps on the KL to uniform, logits summed over the iterates
    doc.py       DOC, directional orthogonal counterattack (AAAI 2026): TTC's objective with orthogonal
                 exploration, momentum and a noise-sensitivity gate
    dbd.py       DBD, directional bias-guided defense (ICLR 2026): forward-only, 32 augmented views
    agc.py       AGC, adaptive geodesic correction: forward-only, 32 perspective views
    rn.py        RN, random noise: TTC's random start alone, one forward (TTC's Table 1 baseline)
    augment.py   the augmentations of DBD and AGC (crops, bit depth, JPEG, filters, perspective) as tensor ops
    views.py     SCC's label-preserving views (flip, zoom, noise) as differentiable, exportable ops
    registry.py  the `Defense` records (config, procedure, draws, presets, expected passes), name parsing
    defended.py  `Defended` (the nn.Module every backend wraps) and `defend`

Imports only the foundation modules (scc.models, scc.draws, scc.grad, scc.perturbation, ...).
"""
from .defended import Defended, defend
from .registry import (DEFENSES, MODEL_PRESETS, PASS_KEYS, PRESETS, Defense, defense_labels, defense_specs,
                       expected_passes, label_of, make_config, parse_defense, parse_defenses, spec_of, split_label,
                       split_spec)

__all__ = ["Defended", "defend", "DEFENSES", "MODEL_PRESETS", "PASS_KEYS", "PRESETS", "Defense", "defense_specs",
           "expected_passes", "make_config", "parse_defense", "parse_defenses", "spec_of", "split_spec",
           # deprecated aliases of defense_specs, spec_of and split_spec, kept for one release
           "defense_labels", "label_of", "split_label"]

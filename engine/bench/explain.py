"""`scc bench --explain`: encoder passes per image of each defense, counted in a real eager run (scc.passes) and set
beside what the defense's record expects (spec section 5).

    row = count_row(clf, "scc-latency", x)      # {"measured": {...}, "expected": {...}, "match": True}
    print(format_explain([row], "scc-tiny-digits"))
"""
from __future__ import annotations

import torch

from ..defenses import PASS_KEYS, defend, expected_passes, split_spec
from ..models import ZeroShotClassifier
from ..passes import count_passes


def count_row(clf: ZeroShotClassifier, spec: str, x: torch.Tensor, seed: int = 0) -> dict:
    """Encoder passes per image of the defense `spec`, counted in a real eager run on one image."""
    name, preset = split_spec(spec)
    defended = defend(clf, name, preset=preset, seed=seed)
    with count_passes(clf, 1) as counter:
        defended(x[:1])
    measured = counter.summary()
    measured["rounds"] = counter.image_rounds + counter.text_rounds
    expected = expected_passes(name, preset)
    row = {"defense": name, "spec": spec, "measured": {k: measured[k] for k in PASS_KEYS}, "expected": expected,
           "text_prompts": clf.num_classes if measured["text_forwards"] else 0}
    row["match"] = None if expected is None else all(row["measured"][k] == row["expected"][k] for k in PASS_KEYS)
    return row


def format_explain(rows: list[dict], model: str) -> str:
    head = (f"{'defense':<14}{'img fwd':>9}{'img bwd':>9}{'text fwd':>10}{'text bwd':>10}{'rounds':>8}"
            f"{'img fwd-eq':>12}   spec section 5 (fwd/bwd/text fwd/text bwd/rounds)")
    lines = [f"encoder passes per image, counted in an eager run of {model} on one image "
             f"(a backward shares its forward's round; fwd-eq = fwd + 2 x bwd)", head, "-" * len(head)]
    for r in rows:
        m = r["measured"]
        fmt = lambda v: f"{v:g}"
        expected = ("/".join(fmt(r["expected"][k]) for k in PASS_KEYS) + ("  ok" if r["match"] else "  MISMATCH")
                    if r["expected"] else "not in the spec table")
        lines.append(f"{r['spec']:<14}{fmt(m['image_forwards']):>9}{fmt(m['image_backwards']):>9}"
                     f"{m['text_forwards']:>10}{m['text_backwards']:>10}{m['rounds']:>8}"
                     f"{fmt(m['image_forwards'] + 2 * m['image_backwards']):>12}   {expected}")
        if r["text_prompts"]:
            lines[-1] += f"  (each text pass: {r['text_prompts']} prompts)"
    return "\n".join(lines)

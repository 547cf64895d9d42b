"""Counting encoder passes in a real run (spec section 5), not from a formula.

`count_passes(classifier)` attaches a counter to the classifier: every image-encoder call adds one sequential
round and (rows / B) forwards per image, and an identity autograd.Function inserted in front of the encoder
adds (rows / B) backwards per image when a gradient flows back through it (also under torch.func.grad).
Text-encoder calls (R-TPT) are counted by the defense through `counter.text(...)`.

`count_row(clf, "scc-latency", x)` runs a defense once under the counter and sets the result beside the spec's
section-5 table (`SPEC_PASSES`); `format_explain` prints such rows (`scc bench --explain`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .models import ZeroShotClassifier


@dataclass
class PassCounter:
    batch: int = 1
    image_forwards: float = 0.0
    image_backwards: float = 0.0
    image_rounds: int = 0
    text_forwards: int = 0
    text_backwards: int = 0
    text_rounds: int = 0
    log: list = field(default_factory=list)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        self.image_forwards += x.shape[0] / self.batch
        self.image_rounds += 1
        self.log.append(("image", x.shape[0]))
        return _CountBackward.apply(x, self) if torch.is_grad_enabled() else x

    def text(self, n_prompts: int, backward: bool = False) -> None:
        self.text_forwards += 1
        self.text_rounds += 1
        self.text_backwards += int(backward)
        self.log.append(("text", n_prompts))

    def summary(self) -> dict:
        return {"image_forwards": round(self.image_forwards, 3), "image_backwards": round(self.image_backwards, 3),
                "image_rounds": self.image_rounds, "text_forwards": self.text_forwards,
                "text_backwards": self.text_backwards}


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(x, counter):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.counter = inputs[1]
        ctx.rows = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.image_backwards += ctx.rows / ctx.counter.batch
        return grad, None

    @staticmethod
    def vmap(info, in_dims, x, counter):  # pragma: no cover - not used by the engine
        return x, in_dims[0]


@contextlib.contextmanager
def count_passes(classifier, batch: int):
    """with count_passes(clf, B) as c: defended(x)  ->  c.summary() per image."""
    counter = PassCounter(batch=batch)
    old = getattr(classifier, "counter", None)
    classifier.counter = counter
    try:
        yield counter
    finally:
        classifier.counter = old


# Spec section 5, per image: image-encoder forwards, backwards, text-encoder forwards, backwards, sequential
# rounds. A backward shares its forward's round (TTC: reference, 2 steps, final = 4). R-TPT "minimal
# equivalent": 1 image round, then text forward+backward (the tuning step), then the tuned text forward.
SPEC_PASSES = {
    "none": (1, 0, 0, 0, 1),
    "ttc": (4, 2, 0, 0, 4),
    "scc": (19, 14, 0, 0, 7),
    "scc-latency": (10, 5, 0, 0, 4),
    "rtpt": (64, 0, 2, 1, 3),
}
PASS_KEYS = ("image_forwards", "image_backwards", "text_forwards", "text_backwards", "rounds")


def count_row(clf: ZeroShotClassifier, spec: str, x: torch.Tensor, seed: int = 0) -> dict:
    """Encoder passes per image of defense `spec`, counted in a real eager run on one image."""
    from .defenses import defend, split_defense_name

    name, preset = split_defense_name(spec)
    defended = defend(clf, name, preset=preset, seed=seed)
    with count_passes(clf, 1) as counter:
        defended(x[:1])
    measured = counter.summary()
    measured["rounds"] = counter.image_rounds + counter.text_rounds
    expected = SPEC_PASSES.get(spec)
    row = {"defense": spec, "measured": {k: measured[k] for k in PASS_KEYS},
           "expected": dict(zip(PASS_KEYS, expected)) if expected else None,
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
        spec = ("/".join(fmt(r["expected"][k]) for k in PASS_KEYS) + ("  ok" if r["match"] else "  MISMATCH")
                if r["expected"] else "not in the spec table")
        lines.append(f"{r['defense']:<14}{fmt(m['image_forwards']):>9}{fmt(m['image_backwards']):>9}"
                     f"{m['text_forwards']:>10}{m['text_backwards']:>10}{m['rounds']:>8}"
                     f"{fmt(m['image_forwards'] + 2 * m['image_backwards']):>12}   {spec}")
        if r["text_prompts"]:
            lines[-1] += f"  (each text pass: {r['text_prompts']} prompts)"
    return "\n".join(lines)

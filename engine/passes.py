"""Counting encoder passes in a real run (spec section 5), not from a formula.

`count_passes(classifier)` attaches a counter to the classifier: every image-encoder call adds one sequential
round and (rows / B) forwards per image, and an identity autograd.Function inserted in front of the encoder
adds (rows / B) backwards per image when a gradient flows back through it (also under torch.func.grad).
Text-encoder calls (R-TPT) are counted by the defense through `counter.text(...)`.

The expected counts live in each defense's record (scc.defenses.registry, `passes`); `scc bench --explain`
(scc.bench.explain) runs each defense once under the counter and sets the two side by side.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


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

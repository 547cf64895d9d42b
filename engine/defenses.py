"""`defend(classifier, name, preset, **overrides)`: a defended `nn.Module`, [0,1] pixels in, logits out.

A defense = (config dataclass, procedure, draws). The procedure is a pure function of the classifier, the
pixels, the config and its random draws; the module only owns a seeded `torch.Generator` that makes those
draws, so every backend (eager, compiled, Triton, ONNX) can be fed identical ones.

Config resolution: the preset (`paper`, `latency`) -> the model's own overrides (MODEL_PRESETS, keyed by
open_clip model name) -> the caller's overrides (`warmup__steps=1` reaches into the nested warm-up config).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from .data import check_pixels
from .models import SccError, TINY_NAME, ZeroShotClassifier
from .rtpt import RTPTConfig, rtpt, rtpt_draws
from .scc_defense import SCCConfig, scc, scc_draws
from .ttc import TTCConfig, ttc, ttc_draws


@dataclasses.dataclass
class NoDefenseConfig:
    pass


def _none(clf, x, cfg, **_):
    return clf(x)


def _no_draws(x, cfg, generator=None):
    return {}


# name -> (config class, procedure(clf, x, cfg, **draws) -> logits, draws(x, cfg, generator) -> dict)
DEFENSES: dict[str, tuple[type, Callable, Callable]] = {
    "none": (NoDefenseConfig, _none, _no_draws),
    "ttc": (TTCConfig, ttc, lambda x, cfg, generator=None: ttc_draws(x, generator)),
    "scc": (SCCConfig, scc, scc_draws),
    "rtpt": (RTPTConfig, rtpt, rtpt_draws),
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "none": {"paper": {}},
    "ttc": {"paper": {}},  # the official run script's defaults
    "scc": {
        "paper": {},  # K_w = 2, S = 3, L = 4 (spec section 3.4)
        # same number of sequential rounds as TTC (4): K_w = 1, S = 1, Stage 1 fused with the first step
        "latency": {"warmup__steps": 1, "steps": 1, "fuse": True},
    },
    "rtpt": {"paper": {}},  # 64 views, "a photo of a", AdamW lr 5e-3, 1 step, p = 0.1, top-20, T = 0.01
}

# Per-model overrides on top of every preset. Digits are not flip-invariant (a flipped 2 or 7 is another
# glyph), so the bundled model's views replace the flip by a 0.85 centre zoom; see README "Bundled model".
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    TINY_NAME: {"scc": {"views": ("id", "zoom0.85", "noise", "zoom0.85+noise"), "sigma": 0.02},
                "rtpt": {"flip": False}},  # R-TPT's RandomResizedCrop+flip views: no flip for digits
}


def split_defense_name(spec: str) -> tuple[str, str]:
    """'scc-latency' -> ('scc', 'latency'); 'ttc' -> ('ttc', 'paper')."""
    name, _, preset = spec.partition("-")
    return name, preset or "paper"


def make_config(name: str, preset: str = "paper", model: str = "", **overrides) -> Any:
    if name not in DEFENSES:
        raise SccError(f"unknown defense {name!r}; choose from {sorted(DEFENSES)}")
    if preset not in PRESETS[name]:
        raise SccError(f"unknown preset {preset!r} for {name}; choose from {sorted(PRESETS[name])}")
    values = {**PRESETS[name][preset], **MODEL_PRESETS.get(model, {}).get(name, {}), **overrides}
    cls = DEFENSES[name][0]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    top, nested = {}, {}
    for key, value in values.items():
        head, _, sub = key.partition("__")
        if head not in fields:
            raise SccError(f"{name} has no setting {head!r}; settings: {sorted(fields)}")
        (nested.setdefault(head, {}).__setitem__(sub, value) if sub else top.__setitem__(head, value))
    for head, sub in nested.items():
        base = top.get(head) or fields[head].default_factory()
        top[head] = dataclasses.replace(base, **sub)
    try:
        return cls(**top)
    except TypeError as err:
        raise SccError(f"bad settings for {name}: {err}") from err


class Defended(nn.Module):
    """A test-time defended classifier: forward(x in [0,1], draws=None) -> logits.

    Unchanged torchattacks/AutoAttack usage: `torchattacks.PGD(defended, eps=...)`. Randomness comes from
    `self.generator` (seeded by `seed`) unless `draws` is given (see `draws(x)` for its keys and shapes).
    """

    def __init__(self, classifier: ZeroShotClassifier, name: str, config: Any, seed: int = 0, preset: str = "paper"):
        super().__init__()
        self.classifier = classifier
        self.defense, self.preset, self.config, self.seed = name, preset, config, seed
        self._procedure, self._draws = DEFENSES[name][1], DEFENSES[name][2]
        self.generator: torch.Generator | None = None
        self.validate = True  # check finiteness and the [0,1] range on every call (one host sync)

    def reseed(self, seed: int | None = None) -> None:
        self.seed = self.seed if seed is None else seed
        self.generator = None

    def draws(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return self._draws(x, self.config, generator=self.generator)

    def forward(self, x: torch.Tensor, draws: dict[str, torch.Tensor] | None = None, trace: list | None = None):
        self.classifier.check_shape(x)
        if self.validate:  # NaN/Inf or out-of-range pixels: name the bad images instead of returning garbage
            check_pixels(x)
        draws = self.draws(x) if draws is None else draws
        extra = {"trace": trace} if trace is not None else {}
        if x.requires_grad and torch.is_grad_enabled():
            # An adaptive attack differentiates through the defense's own gradient steps: that needs the
            # twice-differentiable math attention (the fused CPU/GPU kernels have no double backward).
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return self._procedure(self.classifier, x, self.config, **draws, **extra)
        return self._procedure(self.classifier, x, self.config, **draws, **extra)

    def extra_repr(self) -> str:
        return f"defense={self.defense}, preset={self.preset}, config={self.config}"


def defend(classifier: ZeroShotClassifier, name: str = "scc", preset: str = "paper", seed: int = 0,
           **overrides) -> Defended:
    """Wrap a zero-shot classifier in a test-time defense: 'none' | 'ttc' | 'scc' (| 'rtpt')."""
    if "-" in name and preset == "paper":
        name, preset = split_defense_name(name)
    config = make_config(name, preset, classifier.name, **overrides)
    return Defended(classifier, name, config, seed=seed, preset=preset)

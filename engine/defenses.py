"""`defend(classifier, name, preset, **overrides)`: a defended `nn.Module`, [0,1] pixels in, logits out.

A defense is one `Defense` record: its config dataclass (frozen: a compiled graph captures it), its procedure
(a pure function of the classifier, the pixels, the config and the random draws), its draws (declared once as
`key -> scc.draws.Draw`), its presets, and what the other backends can do with it. The module only owns a
seeded `torch.Generator` that makes the draws, so every backend (eager, compiled, Triton, ONNX) can be fed
identical ones.

Adding a defense = its file (config, procedure, draws) + one entry in DEFENSES, e.g.
    "mine": Defense("mine", MyConfig, my_procedure, {"start": Draw("uniform", -1.0, 1.0)},
                    presets={"paper": {}}, compiles=True, exports=True),

Config resolution: the preset (`paper`, `latency`) -> the model's own overrides (MODEL_PRESETS, keyed by
open_clip model name) -> the caller's overrides (`warmup__steps=1` reaches into the nested warm-up config).
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
import torch.nn as nn

from .draws import Draw, draw_shapes, keyed_draws, make_draws
from .models import SccError, TINY_NAME, ZeroShotClassifier
from .plumbing import attention, validate_pixels
from .rtpt import RTPT_DRAWS, RTPTConfig, rtpt
from .scc_defense import SCC_DRAWS, SCCConfig, scc
from .ttc import TTC_DRAWS, TTCConfig, ttc


@dataclasses.dataclass(frozen=True)
class NoDefenseConfig:
    pass


def _none(clf, x, cfg, trace=None, record=None):
    if record is not None:
        record["perturbation"] = torch.zeros_like(x)
    return clf.logits_from_embedding(clf.embed(x))  # Defended.forward validated x already


@dataclasses.dataclass(frozen=True)
class Defense:
    """One test-time defense and what each backend may do with it.

    procedure(clf, x (B,3,S,S), cfg, **draws, trace=None) -> logits (B, C); `draw_specs` declares every
    random input (distribution and per-image shape); `compiles`: one fullgraph torch.compile graph
    (scc.compiled.Engine); `exports`: one ONNX graph (scc.export), with `in_graph_draws` the draws ONNX can
    make itself (RandomUniformLike / RandomNormal), the others must be fed as inputs.
    """
    name: str
    config_cls: type
    procedure: Callable[..., torch.Tensor]
    draw_specs: Mapping[str, Draw]
    presets: Mapping[str, Mapping[str, Any]]
    compiles: bool = True
    exports: bool = True
    why_not: str = ""  # why a backend refuses it (shown in the error)

    def draws(self, x: torch.Tensor, cfg, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draws for a batch from one generator stream (example inputs for compiling and tracing)."""
        return make_draws(self.draw_specs, cfg, x, generator)

    def keyed_draws(self, x: torch.Tensor, cfg, seed: int, keys: Sequence[Hashable]) -> dict[str, torch.Tensor]:
        """Per-image draws: row b depends on (seed, keys[b]) only (scc.draws.keyed_draws)."""
        return keyed_draws(self.draw_specs, cfg, x, seed, keys)

    def draw_shapes(self, cfg, image: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return draw_shapes(self.draw_specs, cfg, image)

    def require(self, backend: str, capability: str) -> None:
        """Raise SccError up front when `backend` (needing `capability`: 'compiles' | 'exports') cannot run it."""
        if not getattr(self, capability):
            raise SccError(f"defense {self.name!r} does not run on the {backend} backend: {self.why_not}; "
                           "use the eager backend for it")


DEFENSES: dict[str, Defense] = {
    "none": Defense("none", NoDefenseConfig, _none, {}, presets={"paper": {}}),
    "ttc": Defense("ttc", TTCConfig, ttc, TTC_DRAWS, presets={"paper": {}}),  # the official run script's defaults
    "scc": Defense("scc", SCCConfig, scc, SCC_DRAWS, presets={
        "paper": {},  # K_w = 2, S = 3, L = 4 (spec section 3.4)
        # same number of sequential rounds as TTC (4): K_w = 1, S = 1, Stage 1 fused with the first step
        "latency": {"warmup__steps": 1, "steps": 1, "fuse": True},
    }),
    # 64 views, "a photo of a", AdamW lr 5e-3, 1 step, p = 0.1, top-20, T = 0.01
    "rtpt": Defense("rtpt", RTPTConfig, rtpt, RTPT_DRAWS, presets={"paper": {}}, compiles=False, exports=False,
                    why_not="R-TPT tunes the text prompt with the open_clip text tower and an optimizer, which the "
                            "compiled engine's classifier copy and the exporter do not carry"),
}

PRESETS: dict[str, Mapping[str, Mapping[str, Any]]] = {name: d.presets for name, d in DEFENSES.items()}

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


def defense_names() -> list[str]:
    """Every name the CLI and `defend` accept: 'none', 'ttc', 'scc', 'scc-latency', 'rtpt' (name-preset)."""
    return [n if p == "paper" else f"{n}-{p}" for n, d in DEFENSES.items() for p in d.presets]


def parse_defense(spec: str) -> tuple[str, str]:
    """'scc-latency' -> ('scc', 'latency') after checking both exist; SccError listing the valid names."""
    name, preset = split_defense_name(str(spec).strip().lower())
    if name not in DEFENSES:
        raise SccError(f"unknown defense {spec!r}; choose from {', '.join(defense_names())}")
    if preset not in PRESETS[name]:
        raise SccError(f"unknown preset {preset!r} for {name}; choose from {sorted(PRESETS[name])} "
                       f"(defense names: {', '.join(defense_names())})")
    return name, preset


def make_config(name: str, preset: str = "paper", model: str = "", **overrides) -> Any:
    if name not in DEFENSES:
        raise SccError(f"unknown defense {name!r}; choose from {', '.join(defense_names())}")
    if preset not in PRESETS[name]:
        raise SccError(f"unknown preset {preset!r} for {name}; choose from {sorted(PRESETS[name])}")
    values = {**PRESETS[name][preset], **MODEL_PRESETS.get(model, {}).get(name, {}), **overrides}
    cls = DEFENSES[name].config_cls
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
    """A test-time defended classifier: forward(x in [0,1], draws=None, keys=None) -> logits.

    Unchanged torchattacks/AutoAttack usage: `torchattacks.PGD(defended, eps=...)`.

    Randomness is per image and secret by default. Image b's draws are a function of (seed, keys[b]) only
    (scc.draws.keyed_draws), never of its batch: served alone or at position 5 of 8, an image with the same key
    gets the same draws and the same answer on every backend. `seed=None` (the default) takes a fresh secret
    from the OS for this module, so an attacker who has the code still does not know the draws; pass an int for
    reproducible runs (`self.seed` then records it; it stays None for a secret seed). `keys` defaults to a
    running index: the i-th image this module sees (since construction or `reseed`) has key i, so a dataset
    fed in order gets its dataset index, whatever the batch size. Give keys (a request id, a dataset index) to
    pin an image's draws, or pass `draws` to replay exact draws.
    """

    def __init__(self, classifier: ZeroShotClassifier, name: str, config: Any, seed: int | None = None,
                 preset: str = "paper"):
        super().__init__()
        self.classifier = classifier
        self.defense, self.preset, self.config = name, preset, config
        self.spec: Defense = DEFENSES[name]
        self.validate = True  # check finiteness and the [0,1] range on every call (one host sync)
        self.dtype = torch.float32  # of the image tower (see with_dtype)
        self.reseed(seed)

    @property
    def label(self) -> str:
        """'scc-latency', 'ttc', ...: the name the CLI and the reports use."""
        return self.defense if self.preset == "paper" else f"{self.defense}-{self.preset}"

    def reseed(self, seed: int | None = None) -> None:
        """A new seed (None: a fresh secret one) and the running key back to 0."""
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise SccError(f"seed must be an integer or None (a fresh secret seed), got {seed!r}")
        self.seed = seed
        self._secret = secrets.randbits(63) if seed is None else seed
        self.next_key = 0

    def keys_for(self, n: int, keys: Sequence[Hashable] | None = None) -> list:
        """The keys of n images: the given ones (checked), else the next n of the running index."""
        if keys is None:
            keys = list(range(self.next_key, self.next_key + n))
            self.next_key += n
        keys = list(keys)
        if len(keys) != n:
            raise SccError(f"keys: one per image, got {len(keys)} keys for {n} images")
        return keys

    def draws(self, x: torch.Tensor, keys: Sequence[Hashable] | None = None) -> dict[str, torch.Tensor]:
        """This module's draws for the images x (B, 3, H, W): row b from (seed, keys[b])."""
        return self.spec.keyed_draws(x, self.config, self._secret, self.keys_for(x.shape[0], keys))

    def forward(self, x: torch.Tensor, draws: dict[str, torch.Tensor] | None = None, trace: list | None = None,
                keys: Sequence[Hashable] | None = None, record: dict | None = None):
        # shape and dtype (the classifier's, float32) always; NaN/Inf or out-of-range pixels (one host sync)
        # unless validate is off
        dtype = self.classifier.mean.dtype if x.is_floating_point() else None  # uint8 gets its own message
        validate_pixels(x, self.classifier.image_size, dtype=dtype, values=self.validate)
        draws = self.draws(x, keys) if draws is None else draws
        extra = {"trace": trace} if trace is not None else {}
        if record is not None:
            extra["record"] = record
        # An adaptive attack differentiates through the defense's own gradient steps: double backward.
        purpose = "differentiable" if x.requires_grad and torch.is_grad_enabled() else "eager"
        with attention(purpose, x.device):
            return self.spec.procedure(self.classifier, x, self.config, **draws, **extra)

    def perturbation(self, x: torch.Tensor, draws: dict[str, torch.Tensor] | None = None,
                     keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """The final corrective perturbation (B, 3, H, W) the defense adds to x before it predicts (zeros for
        'none' and R-TPT), e.g. for BPDA-style attacks that hold it constant."""
        record: dict = {}
        self.forward(x, draws, keys=keys, record=record)
        return record["perturbation"]

    def with_dtype(self, dtype: torch.dtype, export: bool = False) -> "Defended":
        """The same defense (config, seed, secret, running key) on a copy of the classifier whose image tower runs
        in `dtype` (weights and activations; the perturbation, its steps, the losses and the logits stay fp32).

        export=True: the tower the ONNX export traces: its LayerNorms also run in fp32 (torch's exporter types an
        fp16 layer norm's saved statistics fp16 and ONNX Runtime refuses the file), and fp16 is allowed on a CPU
        (the trace only records it; the file runs elsewhere)."""
        from .compiled import engine_classifier
        from .roofline import check_dtype_on_device

        if dtype == self.dtype and (dtype == torch.float32 or not export):
            return self
        if not export:
            check_dtype_on_device(dtype, self.classifier.text.device)
        base = self.base_classifier if self.dtype != torch.float32 else self.classifier
        clf = base if dtype == torch.float32 else engine_classifier(base, dtype, fp32_norms=export)
        out = Defended(clf, self.defense, self.config, seed=self.seed, preset=self.preset)
        out._secret, out.next_key, out.validate, out.dtype = self._secret, self.next_key, self.validate, dtype
        out.base_classifier = base
        return out

    def extra_repr(self) -> str:
        seed = "secret" if self.seed is None else self.seed
        return f"defense={self.defense}, preset={self.preset}, seed={seed}, config={self.config}"


def defend(classifier: ZeroShotClassifier, name: str = "scc", preset: str = "paper", seed: int | None = None,
           dtype: torch.dtype = torch.float32, **overrides) -> Defended:
    """Wrap a zero-shot classifier in a test-time defense: 'none' | 'ttc' | 'scc' | 'scc-latency' | 'rtpt'.

    seed=None (default): a fresh secret seed (production); an int: reproducible draws (see `Defended`).
    dtype: the image tower's precision, torch.float32 (default), bfloat16 or float16 (GPU, or a CPU with native
    fp16 matmuls); the perturbation, its sign steps and projection, the losses and the logits stay fp32."""
    if "-" in name and preset == "paper":
        name, preset = split_defense_name(name)
    config = make_config(name, preset, classifier.name, **overrides)
    defended = Defended(classifier, name, config, seed=seed, preset=preset)
    return defended if dtype == torch.float32 else defended.with_dtype(dtype)

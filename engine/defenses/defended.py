"""`defend(classifier, name, preset, **overrides)`: a defended `nn.Module`, [0,1] pixels in, logits out.

The module owns the defense's config and a secret seed that makes its per-image draws; the procedure itself is
the pure function of the defense's record (scc.defenses.registry), so every backend can be fed identical draws.

    defended = scc.defend(clf, "scc-latency", seed=0)
    logits = defended(x)                          # draws from (seed, running key); or keys=[...], or draws={...}
    draws = defended.draws(x, keys=[3, 4])        # the exact draws, to replay on another backend
    x, draws = defended.example_inputs(batch=4)   # value-free example inputs for compiling and tracing
"""
from __future__ import annotations

import dataclasses
import secrets
import warnings
from typing import Any, Hashable, Sequence

import torch
import torch.nn as nn

from ..attention import attention
from ..errors import SccError
from ..models import ZeroShotClassifier
from ..precision import check_dtype_on_device, engine_classifier
from ..validation import validate_pixels
from .registry import DEFENSES, Defense, make_config, parse_defense, spec_of


class Defended(nn.Module):
    """A test-time defended classifier: forward(x in [0,1], draws=None, keys=None) -> logits.

    Any attack on a [0,1] -> logits module runs on it unchanged: `scc.attacks.apgd(defended, x, y, eps)`.

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
        self.record: Defense = DEFENSES[name]
        self.validate = True  # check finiteness and the [0,1] range on every call (one host sync)
        self.dtype = torch.float32  # of the image tower (see with_dtype)
        self.reseed(seed)

    @property
    def spec(self) -> str:
        """'scc-latency', 'ttc', 'scc:semantic=off', ...: the defense's spec, as the CLI and the reports write it
        (`defense` is the bare name, `preset` the preset with any config overrides)."""
        return spec_of(self.defense, self.preset)

    @property
    def label(self) -> str:
        """Deprecated: use `spec` (the same string; this name goes in the next release)."""
        warnings.warn("Defended.label is deprecated; use Defended.spec", DeprecationWarning, stacklevel=2)
        return self.spec

    def reseed(self, seed: int | None = None) -> None:
        """A new seed (None: a fresh secret one) and the running key back to 0."""
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
            raise SccError(f"seed must be an integer in [0, 2**63) or None (a fresh secret seed), got {seed!r}")
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
        return self.record.keyed_draws(x, self.config, self._secret, self.keys_for(x.shape[0], keys))

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
            return self.record.procedure(self.classifier, x, self.config, **draws, **extra)

    def perturbation(self, x: torch.Tensor, draws: dict[str, torch.Tensor] | None = None,
                     keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """The final corrective perturbation (B, 3, H, W) the defense adds to x before it predicts (zeros for
        'none' and R-TPT), e.g. for BPDA-style attacks that hold it constant."""
        record: dict = {}
        self.forward(x, draws, keys=keys, record=record)
        return record["perturbation"]

    def example_inputs(self, batch: int, seed: int = 0, device: torch.device | str | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Random pixels (batch, 3, S, S) and draws for them from a private generator (this module's seed and
        running key stay untouched). The values never matter (graphs are value-free); shapes and dtypes do."""
        clf = self.classifier
        device = clf.text.device if device is None else torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.rand(batch, 3, clf.image_size, clf.image_size, generator=gen, device=device)
        return x, self.record.draws(x, self.config, gen)

    def with_dtype(self, dtype: torch.dtype, export: bool = False) -> "Defended":
        """The same defense (config, seed, secret, running key) on a copy of the classifier whose image tower runs
        in `dtype` (weights and activations; the perturbation, its steps, the losses and the logits stay fp32).

        export=True: the tower the ONNX export traces: its LayerNorms also run in fp32 (torch's exporter types an
        fp16 layer norm's saved statistics fp16 and ONNX Runtime refuses the file), and fp16 is allowed on a CPU
        (the trace only records it; the file runs elsewhere)."""
        if dtype == self.dtype and (dtype == torch.float32 or not export):
            return self
        if not export:
            check_dtype_on_device(dtype, self.classifier.text.device)
        base = self.base_classifier if self.dtype != torch.float32 else self.classifier
        clf = base if dtype == torch.float32 else engine_classifier(base, dtype, fp32_norms=export)
        return self._sibling(clf, self.config, dtype, base)

    def with_config(self, **changes) -> "Defended":
        """The same defense (seed, secret, running key, classifier and its dtype) with config fields changed: the
        same draws for the same keys, e.g. an attacker's surrogate of it (scc.eval.suite)."""
        return self._sibling(self.classifier, dataclasses.replace(self.config, **changes), self.dtype,
                             getattr(self, "base_classifier", None))

    def _sibling(self, classifier, config, dtype: torch.dtype, base) -> "Defended":
        """A Defended that shares this one's identity (defense, preset, seed, secret, running key, validation):
        the same draws for the same keys; `base` is the fp32 classifier a reduced-precision copy was made from."""
        out = Defended(classifier, self.defense, config, seed=self.seed, preset=self.preset)
        out._secret, out.next_key, out.validate, out.dtype = self._secret, self.next_key, self.validate, dtype
        if base is not None:
            out.base_classifier = base
        return out

    def extra_repr(self) -> str:
        seed = "secret" if self.seed is None else self.seed
        return f"defense={self.defense}, preset={self.preset}, seed={seed}, config={self.config}"


def defend(classifier: ZeroShotClassifier, name: str = "scc", preset: str = "paper", seed: int | None = None,
           dtype: torch.dtype = torch.float32, **overrides) -> Defended:
    """Wrap a zero-shot classifier in a test-time defense: 'none' | 'ttc' | 'scc' | 'scc-latency' | 'rtpt' |
    'anti-adv' | 'anti-adv-ttc-budget' | 'hd' | 'hd-ttc-budget' | 'doc' | 'dbd' | 'agc' | 'rn'
    (scc.defenses.defense_specs()), or any spec with config overrides ('scc:semantic=off:spatial=off';
    scc.defenses.registry.parse_overrides).

    seed=None (default): a fresh secret seed (production); an int: reproducible draws (see `Defended`).
    dtype: the image tower's precision, torch.float32 (default), bfloat16 or float16 (GPU, or a CPU with native
    fp16 matmuls); the perturbation, its sign steps and projection, the losses and the logits stay fp32."""
    name, preset = parse_defense(spec_of(name, preset))  # 'scc-latency', 'anti-adv-original', aliases
    DEFENSES[name].check(classifier)  # a model that cannot run it at all (R-TPT without a CLIP-style text tower)
    config = make_config(name, preset, classifier.name, **overrides)
    defended = Defended(classifier, name, config, seed=seed, preset=preset)
    return defended if dtype == torch.float32 else defended.with_dtype(dtype)

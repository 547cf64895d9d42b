"""Random draws of the defenses, declared once: each defense names its draws as `key -> Draw(distribution,
per-image shape rule)`, and everything that makes draws (the eager module, the compiled engine's warm-up, the
ONNX exporter's example inputs and in-graph random nodes, ONNX Runtime's own draws) reads that declaration.

    START = {"start": Draw("uniform", -1.0, 1.0, like_image)}        # TTC's random start, shape of the image
    draws = make_draws(START, cfg, x, generator)                      # {"start": (B, 3, H, W)}

Distributions (`kind`):
    uniform     low + (high - low) * U[0, 1)          float
    normal      N(0, 1)                                float
    integers    U{low, ..., high - 1}                  int64
    dirichlet   Exp(1) draws normalised over the last dimension (Dirichlet(1, ..., 1))     float
    sign        -1 where U[0, 1) > 0.5, else +1        float
`low`/`high` may be functions of the config (e.g. R-TPT's AugMix severity). Shapes are per image; the
batch dimension comes first.

Per-image draws (what a defended module makes): an image's draws are a function of (seed, that image's key)
alone, never of the batch it sits in:

    draws = keyed_draws(specs, cfg, x, seed, keys=[17, 18, "req-9f2"])   # one CPU generator per image

Each image's generator is seeded with a 63-bit BLAKE2b hash of (seed, key) and draws every key of `specs` in
declaration order on the CPU (so CPU and CUDA runs, and every batch size, see the same numbers); the rows are
then stacked and moved to the pixels' device. The eager module, the compiled engine, ONNX Runtime (draws as
inputs) and a server therefore agree image by image, however the images are batched.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence, Union

import torch

Bound = Union[float, Callable[[Any], float]]
KINDS = ("uniform", "normal", "integers", "dirichlet", "sign")


def like_image(cfg, image: tuple[int, ...]) -> tuple[int, ...]:
    """The shape rule of a draw with one value per pixel: (3, H, W)."""
    return tuple(image)


@dataclass(frozen=True)
class Draw:
    kind: str
    low: Bound = 0.0
    high: Bound = 1.0
    shape: Callable[[Any, tuple[int, ...]], tuple[int, ...]] = like_image  # (config, (3, H, W)) -> per-image shape

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown draw kind {self.kind!r}; choose from {KINDS}")

    def bounds(self, cfg) -> tuple[float, float]:
        value = lambda b: b(cfg) if callable(b) else b
        return value(self.low), value(self.high)

    def sample(self, cfg, batch_shape: tuple[int, ...], image: tuple[int, ...], generator, device,
               dtype: torch.dtype) -> torch.Tensor:
        return self.sample_shape((*batch_shape, *self.shape(cfg, image)), cfg, generator, device, dtype)

    def sample_shape(self, shape: tuple[int, ...], cfg, generator, device, dtype: torch.dtype) -> torch.Tensor:
        """Draws of the full `shape` (batch first). `cfg` is only read by config-dependent bounds."""
        low, high = self.bounds(cfg)
        kw = dict(generator=generator, device=device)
        if self.kind == "uniform":
            return low + (high - low) * torch.rand(shape, dtype=dtype, **kw)
        if self.kind == "normal":
            return torch.randn(shape, dtype=dtype, **kw)
        if self.kind == "integers":
            return torch.randint(int(low), int(high), shape, **kw)
        if self.kind == "dirichlet":
            e = -torch.log1p(-torch.rand(shape, dtype=dtype, **kw))  # Exp(1)
            return e / e.sum(-1, keepdim=True)
        return torch.where(torch.rand(shape, dtype=dtype, **kw) > 0.5, -1.0, 1.0).to(dtype)  # sign


def make_draws(specs: Mapping[str, Draw], cfg, x: torch.Tensor,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One draw per key for the batch x (B, 3, H, W), made in declaration order from `generator`."""
    return {k: d.sample(cfg, (x.shape[0],), tuple(x.shape[1:]), generator, x.device, x.dtype)
            for k, d in specs.items()}


def draw_shapes(specs: Mapping[str, Draw], cfg, image: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """key -> per-image shape (no batch dimension)."""
    return {k: tuple(d.shape(cfg, tuple(image))) for k, d in specs.items()}


def derive_seed(seed: int, key: Hashable) -> int:
    """A 63-bit seed derived from (seed, key) by BLAKE2b (keys: ints or strings): the generator seed of the image with
    `key`, and of every other purpose that needs its own stream (an attack's start on one batch, fresh draws)."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{type(key).__name__}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_draws(specs: Mapping[str, Draw], cfg, x: torch.Tensor, seed: int, keys: Sequence[Hashable],
                shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Per-image draws for x (B, 3, H, W): row b depends only on (seed, keys[b]). `shapes` overrides the
    per-image shapes (a runtime that knows them from its inputs but not the config)."""
    if len(keys) != x.shape[0]:
        raise ValueError(f"need one key per image: {x.shape[0]} images, {len(keys)} keys")
    image = tuple(x.shape[1:])
    per_image = {k: tuple(shapes[k]) if shapes is not None else tuple(d.shape(cfg, image)) for k, d in specs.items()}
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in specs}
    for key in keys:
        gen = torch.Generator().manual_seed(derive_seed(seed, key))
        for k, d in specs.items():
            rows[k].append(d.sample_shape((1, *per_image[k]), cfg, gen, "cpu", x.dtype))
    out = {}
    for k, d in specs.items():
        stacked = torch.cat(rows[k]) if rows[k] else torch.empty((0, *per_image[k]),
                                                                 dtype=torch.int64 if d.kind == "integers" else x.dtype)
        out[k] = stacked.to(x.device)
    return out

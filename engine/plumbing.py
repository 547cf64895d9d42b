"""Plumbing every backend shares, written once: input validation, the attention policy, chunk/pad/slice,
and example inputs for tracing.

    x = validate_pixels(x, clf.image_size)                   # one validator: type, shape, dtype, finite, [0,1]
    with attention("compile", device): ...                   # the one place that picks the SDPA backend
    for lo, n, rows in padded_chunks([x, *draws], 8, 8): ...   # fixed-size chunks, the last one padded
    x, draws = example_inputs(defended, batch=4)              # value-free example inputs for compile/export

Padding repeats a chunk's last row (its image and its draws), so padded rows compute what a real row would
(never NaN) and are sliced off; every image is defended independently, so padding never changes other rows.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .models import SccError


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------
def validate_pixels(x, image_size: int | None = None, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, values: bool = True, name: str = "pixels"):
    """Check a user's pixel batch (B, 3, S, S) and return it unchanged.

    Raises SccError naming the problem and the fix: not a tensor; wrong rank, channels or size (S =
    `image_size`); not floating point (uint8: divide by 255); a dtype other than `dtype`; another device than
    `device`; and with `values` (one host sync) NaN/Inf in named images or pixels outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise SccError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    size = "S, S" if image_size is None else f"{image_size}, {image_size}"
    if x.dim() != 4 or x.shape[1] != 3 or (image_size is not None and tuple(x.shape[2:]) != (image_size,) * 2):
        raise SccError(f"{name}: expected shape (B, 3, {size}) in [0,1], got {tuple(x.shape)}; "
                       "resize/crop images first (scc.data.resize_center_crop)")
    if not x.is_floating_point():
        raise SccError(f"{name}: expected float pixels in [0,1], got dtype {str(x.dtype).removeprefix('torch.')}"
                       + ("; scale uint8 images: x.float() / 255" if x.dtype == torch.uint8 else "; use x.float()"))
    if dtype is not None and x.dtype != dtype:
        raise SccError(f"{name}: expected dtype {str(dtype).removeprefix('torch.')}, got "
                       f"{str(x.dtype).removeprefix('torch.')}; convert with x.to({dtype})")
    if device is not None and x.device != torch.device(device):
        raise SccError(f"{name}: expected a tensor on {device}, got one on {x.device}; use x.to({str(device)!r})")
    if values and x.numel():
        bad = ~torch.isfinite(x).flatten(1).all(1)
        if bad.any():
            raise SccError(f"{name}: images {bad.nonzero().flatten().tolist()} contain NaN or Inf values")
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise SccError(f"{name}: pixels must lie in [0,1], got range [{lo:.3g}, {hi:.3g}]; "
                           "divide 0-255 images by 255")
    return x


def validate_draws(draws: dict, keys: Sequence[str], rows: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, what: str = "the defense") -> list[torch.Tensor]:
    """The draw tensors in `keys` order, each with `rows` rows (and `dtype`/`device`), or an SccError."""
    if sorted(draws) != sorted(keys):
        raise SccError(f"draws for {what} need the keys {sorted(keys)}, got {sorted(draws)}; "
                       "make them with defended.draws(x)")
    out = []
    for k in keys:
        t = draws[k]
        if not isinstance(t, torch.Tensor) or t.shape[0] != rows or (dtype is not None and t.dtype != dtype) \
                or (device is not None and t.device != torch.device(device)):
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise SccError(f"draw {k!r} must be a tensor with {rows} rows"
                           + (f", {str(dtype).removeprefix('torch.')}" if dtype is not None else "")
                           + (f" on {device}" if device is not None else "")
                           + f", got {got}; make draws with defended.draws(x)")
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------------
# Attention policy
# ----------------------------------------------------------------------------------------------------------
ATTENTION_PURPOSES = ("eager", "differentiable", "compile", "trace")


def attention(purpose: str, device: torch.device | str = "cpu"):
    """The SDPA backend a defense runs under, decided here for every backend (a context manager).

    - "eager": PyTorch's own choice (the reference numbers of the eager module).
    - "differentiable": an attack differentiates through the defense's own gradient steps; only the math
      decomposition has a double backward.
    - "trace": make_fx records forward and backward ops for ONNX: the math decomposition (plain matmul +
      softmax, no fused kernel without a backward).
    - "compile": on CPU the math decomposition, which Inductor fuses (flash attention over the few tokens of a
      CLIP image costs more than the attention itself); on CUDA PyTorch's own choice (flash / efficient).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if purpose not in ATTENTION_PURPOSES:
        raise ValueError(f"unknown attention purpose {purpose!r}; choose from {ATTENTION_PURPOSES}")
    if purpose in ("differentiable", "trace") or (purpose == "compile" and torch.device(device).type == "cpu"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Chunking and padding
# ----------------------------------------------------------------------------------------------------------
def pad_rows(tensors: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """Pad every tensor (same leading size n <= rows) to `rows` rows by repeating its last row."""
    n = tensors[0].shape[0]
    if n == rows:
        return list(tensors)
    return [torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])]) for t in tensors]


def padded_chunks(tensors: Sequence[torch.Tensor], size: int,
                  bucket=None) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """(start, real rows n, tensors padded to bucket(n) rows) over chunks of at most `size` rows.

    `bucket(n)` gives the padded size of a chunk of n rows (default: `size`, a fixed-batch graph); pass
    `lambda n: n` for no padding. Slice results back with `[:n]`.
    """
    if size < 1:
        raise SccError(f"chunk size must be a positive integer, got {size!r}")
    total = tensors[0].shape[0]
    for lo in range(0, total, size):
        part = [t[lo: lo + size] for t in tensors]
        n = part[0].shape[0]
        yield lo, n, pad_rows(part, size if bucket is None else bucket(n))


def power_of_two_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself): the batch sizes a static-shape engine compiles."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise SccError(f"max_batch must be a positive integer, got {max_batch!r}")
    return sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})


# ----------------------------------------------------------------------------------------------------------
# Example inputs for compiling and tracing
# ----------------------------------------------------------------------------------------------------------
def example_inputs(defended, batch: int, seed: int = 0, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random pixels (batch, 3, S, S) and draws for them from a private generator: the defended module's own
    generator stays untouched. The values never matter (graphs are value-free); shapes and dtypes do."""
    clf = defended.classifier
    device = clf.text.device if device is None else torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand(batch, 3, clf.image_size, clf.image_size, generator=gen, device=device)
    return x, defended.spec.draws(x, defended.config, gen)

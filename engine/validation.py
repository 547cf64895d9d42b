"""Checks of what users hand the engine, written once: pixel batches, draws, labels, templates and devices.
Each raises SccError naming the bad value and what to do.

    x = validate_pixels(x, clf.image_size)       # type, shape, dtype, device, finite, [0,1]
    args = validate_draws(draws, keys, rows=B)   # the draws a defense needs, one row per image
    labels = check_labels(["cat", "dog"])        # stripped, no duplicates after CLIP's lowercasing
    templates = check_templates(["a photo of a {}."])
    device = check_device("cuda:1")              # present on this machine, or an SccError
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import SccError


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
                       "preprocess image files first: clf.preprocess.file(path) (scc.images.Preprocess)")
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


def check_labels(labels: Sequence[str] | None, what: str = "labels=") -> list[str]:
    """The stripped class names, or an SccError. `what` names the argument in messages: `labels=` for the
    Python API, `--labels` for the command line."""
    example = "labels=['cat', 'dog']" if what.endswith("=") else f"{what} cat,dog"
    if isinstance(labels, str):
        raise SccError(f"{what} must be a list of class names, got the string {labels!r}; e.g. {example}")
    if labels is None or len(labels) == 0:
        raise SccError(f"the label list is empty: give at least two class names, e.g. {example}")
    labels = [str(l).strip() for l in labels]
    if any(not l for l in labels):
        raise SccError(f"the label list {labels} contains an empty name")
    # CLIP's tokenizers lowercase and collapse whitespace: such names would get the same text embedding
    key = lambda l: " ".join(l.lower().split())
    dup = sorted({l for l in labels if [key(m) for m in labels].count(key(l)) > 1})
    if dup:
        raise SccError(f"duplicate labels {dup}: each class must be named once (CLIP lowercases names, so "
                       "names differing only in case are the same class)")
    if len(labels) < 2:
        raise SccError(f"only one label {labels}: zero-shot classification needs at least two")
    return labels


def check_templates(templates: Sequence[str]) -> list[str]:
    """Prompt templates with exactly one `{}` (the class name), or an SccError naming every bad one."""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    bad = []
    for t in templates:
        n = str(t).count("{}")
        try:
            str(t).format("x")
            ok = n == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            bad.append(f"{t!r} ({n} '{{}}')")
    if bad:
        raise SccError(f"template(s) {', '.join(bad)}: every template needs exactly one '{{}}' for the class name and "
                       "no other braces, e.g. 'a photo of a {}.'")
    return templates


def check_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or an SccError when it is malformed or not present on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SccError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"this torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else \
                "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides it)"
            raise SccError(f"device {str(device)!r} is not available: {build}; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SccError(f"device {str(device)!r} is not available: this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s); use cuda:0")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SccError(f"device {str(device)!r} is not available: MPS needs an Apple-silicon Mac with a "
                           "torch build that has it; use cpu")
    elif dev.type != "cpu":
        raise SccError(f"device {str(device)!r} is not supported: use cpu, cuda or mps")
    return dev

"""Image files and encoded bytes -> model inputs: the one preprocessing every entry point uses.

    clf = scc.load("scc-tiny-fashion")
    x = clf.preprocess.file("coat.png")              # (3, S, S) float32 in [0,1]
    x = clf.preprocess.encoded(data, name="upload")  # the service's HTTP and gRPC bodies

`scc classify`, `scc eval` (image folders, torchvision sets), `scc serve` (HTTP and gRPC), `scc loadtest`, the ONNX
files' metadata and the Triton repository all go through `Preprocess`, so one file and one model give one input
tensor whatever the path. A model's rule is a small frozen record (`scc.load` attaches it as `clf.preprocess`; an
ONNX export stores it as `scc.preprocess`; the service shows it in /v1/info):

    1. decode     the first frame; any PIL mode -> RGB in [0,1] (alpha over white, 16-bit scaled)
    2. aspect     the long side is centre-cropped to at most max_aspect x the short side, so the resize below
                  allocates at most about max_aspect (S / crop)^2 pixels whatever the image's shape
    3. resize     bilinear (antialiased when shrinking): the short side to round(inner / crop), inner = size - 2 frame
    4. crop       the centre inner x inner square
    5. frame      zero-pad `frame` pixels on every side -> size x size

    open_clip models       crop 224/256, frame 0: the TTC protocol, Resize(256) -> CenterCrop(224) at S = 224
    scc-tiny-digits        crop 1, frame 0: its 8x8 scans were resized whole to 32x32
    scc-tiny-fashion       crop 1, frame 2: 28x28 Fashion-MNIST images zero-padded to 32x32

An image already inner x inner skips the resize, so a 28x28 Fashion-MNIST PNG gives exactly the bundled test
tensor. Reading is bounded before decoding: `max_pixels` is checked from the header (PIL's own safety limit by
default), and `formats` restricts which decoders untrusted bytes may reach.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SccError

# File suffixes read as images (folders given to `scc classify`, `scc loadtest --image-dir DIR`, imagefolder: sets)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".dib", ".pcx", ".sgi", ".im", ".icns")
CLIP_CROP = 224 / 256  # open_clip / TTC: the centre 224 of a 256 short side
MAX_ASPECT = 4.0  # the widest aspect ratio the resize sees: a longer side is centre-cropped to 4x the short one


class ImageError(SccError):
    """An image that cannot be used, named in the message; `too_large` when it is over a pixel budget."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def pil_to_tensor(img) -> torch.Tensor:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK...) -> (3, H, W) float32 in [0,1]."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top, 0, 1).astype(np.float32)
        return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return torch.from_numpy(arr)[None].expand(3, -1, -1).contiguous()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _open(source: bytes | str | Path, name: str | None, max_pixels: int | None, formats: Sequence[str] | None):
    """(PIL image with only its header read, its name): the file or bytes checked, the size within the budget."""
    from PIL import Image

    if not isinstance(source, (bytes, bytearray, memoryview)):
        path = Path(source)
        name = name or str(path)
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file")
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        source = path
    else:
        name = name or "image"
        if not len(source):
            raise ImageError(f"{name}: empty image")
        source = io.BytesIO(source)
    budget = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's bomb warning: the budget below is the check
            img = Image.open(source, formats=formats)
    except Image.DecompressionBombError as err:  # over twice PIL's own limit: refused inside Image.open
        raise ImageError(f"{name}: image over the per-image limit of {budget} pixels ({err}); downscale it",
                         too_large=True) from None
    except Exception as err:  # untrusted bytes reach PIL's parsers, which raise many kinds: all mean "unreadable"
        raise _unreadable(name, err, formats) from err
    w, h = img.size
    if w < 1 or h < 1:
        img.close()
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if budget is not None and w * h > budget:
        img.close()
        hint = "" if max_pixels is not None else " (or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)"
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceed the per-image limit of {budget} pixels; downscale it"
                         + hint, too_large=True)
    return img, name


def _unreadable(name: str, err: Exception, formats: Sequence[str] | None) -> ImageError:
    accepted = f"; accepted formats: {', '.join(formats)}" if formats else ""
    return ImageError(f"{name}: not a readable image ({type(err).__name__}: {str(err)[:120]}{accepted})")


def image_size(source: bytes | str | Path, name: str | None = None, max_pixels: int | None = None,
               formats: Sequence[str] | None = None) -> tuple[int, int]:
    """(width, height) from the header alone (nothing decoded); ImageError when unreadable or over `max_pixels`."""
    img, _ = _open(source, name, max_pixels, formats)
    with img:
        return img.size


def image_pixels(source: bytes | str | Path, name: str | None = None, max_pixels: int | None = None,
                 formats: Sequence[str] | None = None) -> int:
    """width x height from the header alone (nothing decoded); ImageError when unreadable or over `max_pixels`."""
    w, h = image_size(source, name, max_pixels, formats)
    return w * h


def decode(source: bytes | str | Path, name: str | None = None, max_pixels: int | None = None,
           formats: Sequence[str] | None = None) -> torch.Tensor:
    """Encoded bytes or an image file -> (3, H, W) float32 in [0,1] (the first frame of an animated image).

    The header is read first: width x height over `max_pixels` (default: PIL's Image.MAX_IMAGE_PIXELS) is refused
    before a pixel is decoded. `formats` (PIL format names) limits the decoders untrusted bytes reach. Every
    failure is an ImageError naming the image and what to do."""
    img, name = _open(source, name, max_pixels, formats)
    try:
        with img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            x = pil_to_tensor(img)
    except Exception as err:  # as in _open: any decoder failure on these bytes means "unreadable"
        raise _unreadable(name, err, formats) from err
    if not torch.isfinite(x).all():
        raise ImageError(f"{name}: not a readable image (non-finite pixel values)")
    return x


def resize_center_crop(x: torch.Tensor, size: int, crop: float = CLIP_CROP,
                       max_aspect: float = MAX_ASPECT) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): the long side cut to max_aspect x the short one, the short side resized
    bilinearly (antialiased when shrinking) to round(size / crop), the centre size x size kept. crop = 224/256 is
    torchvision's Resize(256) -> CenterCrop(224)."""
    h, w = x.shape[-2:]
    if max(h, w) > max_aspect * min(h, w):  # keep the centre: what the crop below keeps lies inside it
        keep = max(1, int(max_aspect * min(h, w)))
        if h > w:
            x = x[..., (h - keep) // 2: (h - keep) // 2 + keep, :]
        else:
            x = x[..., (w - keep) // 2: (w - keep) // 2 + keep]
        h, w = x.shape[-2:]
    if (h, w) != (size, size) or crop != 1:  # (at crop 1 the resize would be the identity)
        short = max(size, round(size / crop))
        scale = short / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top: top + size, left: left + size]
    return x.clamp(0, 1)


@dataclass(frozen=True)
class Preprocess:
    """A model's rule from an image to its (3, size, size) input; see the module docstring for the steps."""
    size: int
    crop: float = CLIP_CROP  # fraction of the (framed) short side kept by the centre crop
    frame: int = 0  # black border, pixels per side, of the model's training images
    max_aspect: float = MAX_ASPECT

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size >= 1):
            raise SccError(f"Preprocess: size must be a positive int, got {self.size!r}")
        if not 0 < self.crop <= 1:
            raise SccError(f"Preprocess: crop must be in (0, 1], got {self.crop!r}")
        if not (isinstance(self.frame, int) and 0 <= 2 * self.frame < self.size):
            raise SccError(f"Preprocess: frame must be an int with 0 <= 2 frame < size {self.size}, got {self.frame!r}")
        if not self.max_aspect >= 1:
            raise SccError(f"Preprocess: max_aspect must be >= 1, got {self.max_aspect!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded pixels (3, H, W) or (N, 3, H, W) in [0,1] -> (.., 3, size, size)."""
        batch = x if x.dim() == 4 else x[None]
        inner = self.size - 2 * self.frame
        out = resize_center_crop(batch.float(), inner, self.crop, self.max_aspect)
        if self.frame:
            out = F.pad(out, (self.frame,) * 4)
        return out if x.dim() == 4 else out[0]

    def file(self, path: str | Path) -> torch.Tensor:
        """One image file -> (3, size, size); ImageError naming the file when it cannot be used."""
        return self(decode(path))

    def encoded(self, data: bytes, name: str = "image", max_pixels: int | None = None,
              formats: Sequence[str] | None = None) -> torch.Tensor:
        """Encoded image bytes -> (3, size, size), within a pixel budget and a format allow-list."""
        return self(decode(data, name, max_pixels, formats))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {k: d[k] for k in ("size", "crop", "frame", "max_aspect") if k in d}
        try:
            return cls(**known)
        except TypeError as err:
            raise SccError(f"not a preprocessing record: {d!r} ({err})") from err

"""Images and datasets: the bundled digits and Fashion-MNIST splits, image folders, torchvision sets from a root.

Every loader returns pixels in [0,1], (N, 3, S, S). Image folders and torchvision sets are preprocessed as in the
TTC protocol: bilinear resize of the short side to S*256/224, centre crop S (for S = 224: Resize(256) ->
CenterCrop(224)). The bundled sets are small grayscale images: digits are 8x8 upscaled bilinearly to S; Fashion-MNIST
28x28 images are zero-padded to 32x32 (their background is black) and resized bilinearly to S when S != 32.
"""
from __future__ import annotations

import gzip
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SccError
from .models import asset_path, bundled_meta, is_bundled, load

# Per-dataset prompt templates of the TTC evaluation code (spec section 1.4): one template, no ensembling.
TEMPLATES: dict[str, list[str]] = {
    "cifar10": ["This is a photo of a {}."],
    "cifar100": ["This is a photo of a {}."],
    "stl10": ["This is a photo of a {}."],
    "imagenet": ["This is a photo of a {}."],
    "caltech101": ["This is a photo of a {}."],
    "sun397": ["This is a photo of a {}."],
    "caltech256": ["A photo of a {}."],
    "stanfordcars": ["A photo of a {}."],
    "country211": ["A photo I took in {}."],
    "dtd": ["A surface with a {} texture."],
    "eurosat": ["A centered satellite photo of {}."],
    "fgvcaircraft": ["A photo of a {}, a type of aircraft."],
    "flowers102": ["A photo of a {}, a type of flower."],
    "food101": ["A photo of {}, a type of food."],
    "oxfordpets": ["A photo of a {}, a type of pet."],
    "imagefolder": ["This is a photo of a {}."],
    "fashion": ["a photo of a {}."],  # the bundled scc-tiny-fashion's held-out evaluation prompt (its vocabulary)
}

DTD_CLASSES = (
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous "
    "flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted "
    "meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled "
    "stained stratified striped studded swirly veined waffled woven wrinkled zigzagged").split()

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_SIZE = 450
DIGITS_SPLIT_SEED = 0

# Fashion-MNIST (Zalando, MIT licence): labels 0..9 in the official order, written so that the bundled model's
# word tokenizer (letters, digits, single punctuation marks) reads them: "t-shirt" -> t - shirt.
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_APT = "apt-get install dataset-fashion-mnist"
FASHION_SUBSET = "fashion-test-1000.npz"  # shipped in scc/assets: 100 test images per class
FASHION_SUBSET_SIZE = 1000
FASHION_VAL_SIZE = 5000  # held out of the 60k training split for every modelling choice
FASHION_SPLIT_SEED = 0
# Black frame of each bundled dataset's images (fraction of a side): read_image(..., border=) fits image files
# into the same layout, so `scc classify --model scc-tiny-fashion` on a 28x28 Fashion-MNIST file sees what training saw.
BORDER = {"digits": 0.0, "fashion": 2 / 32}


# File suffixes read as images (folders given to `scc classify`, `scc loadtest --images DIR`, imagefolder: sets)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                  ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".dib", ".pcx", ".sgi", ".im", ".icns")


@dataclass
class Dataset:
    name: str
    images: torch.Tensor  # (N, 3, S, S) in [0,1]
    targets: torch.Tensor  # (N,) long
    classes: list[str]
    templates: list[str]


# ----------------------------------------------------------------------------------------------------------
# Preprocessing and image files
# ----------------------------------------------------------------------------------------------------------
def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): bilinear short side to size*256/224, then centre crop."""
    h, w = x.shape[-2:]
    short = round(size * 256 / 224)
    if (h, w) != (size, size):
        scale = short / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top: top + size, left: left + size]
    return x.clamp(0, 1)


def pil_to_tensor(img) -> torch.Tensor:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK...) -> (3, H, W) float in [0,1]."""
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


def read_image(path: str | Path, size: int, border: float = 0.0) -> torch.Tensor:
    """One image file -> (3, size, size) in [0,1]; SccError naming the file when it cannot be used.

    border: the fraction of each side that is a black frame in the model's training images (Fashion-MNIST:
    2/32): the image is fitted into the inner square, then zero-padded, as `fashion_pixels` does."""
    from PIL import Image, UnidentifiedImageError

    import warnings

    path = Path(path)
    if path.is_dir():
        raise SccError(f"{path}: is a directory, not an image file")
    if not path.is_file():
        raise SccError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse, never hang
            with Image.open(path) as img:
                img.load()
                if img.width < 1 or img.height < 1:
                    raise SccError(f"{path}: empty image ({img.width}x{img.height})")
                x = pil_to_tensor(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SccError(f"{path}: image too large for PIL's safety limit of {Image.MAX_IMAGE_PIXELS} pixels "
                       f"({err}); skipped: downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, SccError):
            raise
        raise SccError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err
    pad = round(border * size)
    if pad:
        inner = size - 2 * pad
        if tuple(x.shape[-2:]) != (inner, inner):
            x = resize_center_crop(x[None], inner)[0]
        return F.pad(x, (pad, pad, pad, pad))
    return resize_center_crop(x[None], size)[0]


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------
def digits_arrays(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits -> (x_train, y_train, x_test, y_test); a fixed stratified 1347/450 split.

    Pixels /16 -> [0,1], bilinear to size x size, 3 channels. The test split is never used for training.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_SIZE, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return x[tr].contiguous(), y[tr], x[te].contiguous(), y[te]


def read_idx_gz(path: Path) -> np.ndarray:
    """One gzip-compressed idx file (the MNIST format) -> uint8 array, (N,) labels or (N, 28, 28) images."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise SccError(f"{path}: not a readable gzip idx file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise SccError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise SccError(f"{path}: truncated idx file ({data.size} bytes for shape {shape})")
    return data.reshape(shape).copy()


def fashion_arrays(split: str = "test", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The official Fashion-MNIST `train` (60k) or `test` (10k) split: uint8 images (N, 28, 28), labels (N,).

    Read from the Debian package's idx files; a missing package is an SccError naming the apt command.
    """
    root = Path(root) if root is not None else FASHION_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise SccError(f"the Fashion-MNIST {split} files are not installed ({images} is missing): run "
                       f"`{FASHION_APT}` (Debian package dataset-fashion-mnist), or use dataset `fashion`, the 1000 "
                       f"test images bundled with scc")
    x, y = read_idx_gz(images), read_idx_gz(labels)
    if x.ndim != 3 or len(x) != len(y):
        raise SccError(f"{images}: expected (N, 28, 28) images matching {len(y)} labels, got {x.shape}")
    return x, y


def fashion_train_val(root: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The official training split cut into (x_train, y_train, x_val, y_val), uint8; stratified, fixed seed.

    55000 training / 5000 validation images (500 per class). The bundled model trains on the first part only and
    every modelling choice (architecture, epochs, augmentation, defense presets) is made on the second.
    """
    from sklearn.model_selection import train_test_split

    x, y = fashion_arrays("train", root)
    tr, va = train_test_split(np.arange(len(y)), test_size=FASHION_VAL_SIZE, stratify=y, random_state=FASHION_SPLIT_SEED)
    tr, va = np.sort(tr), np.sort(va)
    return x[tr], y[tr], x[va], y[va]


def fashion_subset_indices(labels: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the shipped subset in the official test split: stratified, 100 per class, fixed seed."""
    from sklearn.model_selection import train_test_split

    _, idx = train_test_split(np.arange(len(labels)), test_size=FASHION_SUBSET_SIZE, stratify=labels,
                              random_state=FASHION_SPLIT_SEED)
    return np.sort(idx)


def write_fashion_subset(path: Path, root: Path | None = None) -> Path:
    """Build the shipped subset from the Debian test files: images (1000, 28, 28) uint8, labels, test indices."""
    x, y = fashion_arrays("test", root)
    idx = fashion_subset_indices(y)
    np.savez_compressed(path, images=x[idx], labels=y[idx].astype(np.uint8), index=idx.astype(np.int32))
    return Path(path)


def fashion_subset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled 1000 test images: uint8 images (1000, 28, 28), labels (1000,), indices into the test split."""
    path = asset_path(FASHION_SUBSET)
    if not path.is_file():
        raise SccError(f"the bundled Fashion-MNIST subset {path} is missing; reinstall scc")
    with np.load(path) as f:
        return f["images"], f["labels"].astype(np.int64), f["index"].astype(np.int64)


def fashion_pixels(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 3, size, size) in [0,1]: zero-pad 2 pixels per side to 32x32 (the
    images' background is black, so this adds no edge), then a bilinear resize when size != 32."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = F.pad(x.float().div(255.0)[:, None], (2, 2, 2, 2))
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 32)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def _torchvision(name: str, root: str, size: int):
    import torchvision.datasets as tvd

    ctor = {
        "cifar10": lambda: tvd.CIFAR10(root, train=False, download=False),
        "cifar100": lambda: tvd.CIFAR100(root, train=False, download=False),
        "stl10": lambda: tvd.STL10(root, split="test", download=False),
        "dtd": lambda: tvd.DTD(root, split="test", download=False),
        "eurosat": lambda: tvd.EuroSAT(root, download=False),
        "flowers102": lambda: tvd.Flowers102(root, split="test", download=False),
        "food101": lambda: tvd.Food101(root, split="test", download=False),
        "oxfordpets": lambda: tvd.OxfordIIITPet(root, split="test", download=False),
        "fgvcaircraft": lambda: tvd.FGVCAircraft(root, split="test", download=False),
        "country211": lambda: tvd.Country211(root, split="test", download=False),
        "stanfordcars": lambda: tvd.StanfordCars(root, split="test", download=False),
        "pcam": lambda: tvd.PCAM(root, split="test", download=False),
    }
    if name not in ctor:
        raise SccError(f"unknown dataset {name!r}; known: digits, fashion, fashion-full, fashion-val, imagefolder:PATH, "
                       + ", ".join(f"{k}:ROOT" for k in ctor))
    try:
        ds = ctor[name]()
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise SccError(f"dataset {name} not found under {root!r} ({err}); downloads are disabled: "
                       f"place the torchvision-format files there first") from err
    classes = [c.replace("_", " ") if name != "cifar100" else c for c in getattr(ds, "classes", [])]
    if name == "pcam":
        classes = ["healthy lymph node tissue", "lymph node tumor tissue"]
    return ds, classes


def load_dataset(spec: str, size: int, limit: int | None = None) -> Dataset:
    """`digits` | `fashion` | `fashion-full` | `fashion-val` | `imagefolder:PATH` | `<torchvision name>:ROOT`
    -> Dataset (first `limit` images), pixels (N, 3, size, size) in [0,1].

    fashion: the 1000 Fashion-MNIST test images shipped with scc (stratified, 100 per class);
    fashion-full: all 10000 official test images; fashion-val: the 5000 validation images held out of the training
    split (both need the Debian package dataset-fashion-mnist).
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise SccError(f"limit must be a positive number of images or None (all), got {limit!r}")
    name, _, root = spec.partition(":")
    name = name.lower()
    if name == "digits":
        _, _, x, y = digits_arrays(32)
        if size != 32:
            x = resize_center_crop(x, size)
        x, y = (x[:limit], y[:limit]) if limit else (x, y)
        return Dataset("digits", x, y, list(DIGIT_WORDS), ["a photo of the digit {}."])
    if name in ("fashion", "fashion-full", "fashion-val"):
        if root:
            raise SccError(f"dataset {name} takes no location (got {spec!r}); it reads {FASHION_DIR} or the bundled subset")
        if name == "fashion":
            x8, y8, _ = fashion_subset()
        elif name == "fashion-full":
            x8, y8 = fashion_arrays("test")
        else:
            _, _, x8, y8 = fashion_train_val()
        x8, y8 = (x8[:limit], y8[:limit]) if limit else (x8, y8)
        return Dataset(name, fashion_pixels(x8, size), torch.from_numpy(y8.astype(np.int64)), list(FASHION_CLASSES),
                       list(TEMPLATES["fashion"]))
    if not root:
        raise SccError(f"dataset {spec!r} needs a location: {name}:PATH")
    if name == "imagefolder":
        folder = Path(root)
        if not folder.is_dir():
            raise SccError(f"image folder {folder} does not exist")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            n = sum(p.is_file() for p in folder.iterdir())
            raise SccError(f"image folder {folder} has no class sub-folders ({n} files directly inside): "
                           f"imagefolder: needs one sub-folder per class, named after it, e.g. {folder}/cat/1.png, "
                           f"{folder}/dog/2.png")
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir()) if p.is_file()]
        files = files[:limit] if limit else files
        imgs, ys = [], []
        for path, label in files:
            try:
                imgs.append(read_image(path, size))
                ys.append(label)
            except SccError as err:
                print(f"scc: skipping {err}", file=sys.stderr)
        if not imgs:
            raise SccError(f"no readable images under {folder}")
        return Dataset(f"imagefolder:{folder}", torch.stack(imgs), torch.tensor(ys), classes, TEMPLATES["imagefolder"])
    ds, classes = _torchvision(name, root, size)
    n = min(len(ds), limit) if limit else len(ds)
    imgs, ys = [], []
    for i in range(n):
        img, label = ds[i]
        imgs.append(resize_center_crop(pil_to_tensor(img)[None], size)[0])
        ys.append(int(label))
    return Dataset(name, torch.stack(imgs), torch.tensor(ys), classes, TEMPLATES.get(name, TEMPLATES["imagefolder"]))


def classifier_for(dataset: Dataset, model: str, pretrained: str | None = None,
                   templates: Sequence[str] | None = None, device: str | torch.device = "cpu", seed: int = 0):
    """The zero-shot classifier of `model` over `dataset`'s classes: the one place that picks the prompts.

    A bundled model keeps its held-out evaluation template (its word vocabulary covers its own prompts only);
    any other model gets the dataset's templates unless `templates` is given."""
    if templates is None:
        templates = bundled_meta(model)["eval_templates"] if is_bundled(model) else dataset.templates
    return load(model, pretrained, labels=dataset.classes, templates=templates, device=device, seed=seed)

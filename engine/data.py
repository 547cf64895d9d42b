"""Datasets: the bundled digits and Fashion-MNIST splits, image folders, torchvision sets from a root.

Every loader returns pixels in [0,1], (N, 3, S, S), made by the model's `scc.images.Preprocess` from each raw
image (digits: the 8x8 scans /16; Fashion-MNIST: the 28x28 images /255; files and torchvision sets: decoded), the
same function `scc classify` and `scc serve` apply to an image file. So a dataset image saved as a PNG and sent
through any entry point gives the tensor the dataset gives (up to the PNG's 8-bit rounding of digits).
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
from .images import Preprocess
from .models import asset_path, bundled_meta, is_bundled, load, preprocessing_of

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
# shipped in scc/assets: the fine-tuning subset of the training split (the robust testbed models train on it)
FASHION_TRAIN_SUBSET = "fashion-train-2560.npz"
FASHION_TRAIN_SUBSET_SIZE = 2560
FASHION_TRAIN_SUBSET_SEED = 0
FASHION_VAL_SIZE = 5000  # held out of the 60k training split for every modelling choice
FASHION_SPLIT_SEED = 0


@dataclass
class Dataset:
    name: str
    images: torch.Tensor  # (N, 3, S, S) in [0,1]
    targets: torch.Tensor  # (N,) long
    classes: list[str]
    templates: list[str]


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------
def digits_raw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as (x_train, y_train, x_test, y_test), pixels /16 in [0,1], (N, 3, 8, 8); a fixed
    stratified 1347/450 split. The test split is never used for training."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None].expand(-1, 3, -1, -1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_SIZE, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return x[tr].contiguous(), y[tr], x[te].contiguous(), y[te]


def digits_arrays(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`digits_raw` resized bilinearly to size x size: the bundled digits model's training and test pixels."""
    x_tr, y_tr, x_te, y_te = digits_raw()
    up = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return up(x_tr), y_tr, up(x_te), y_te


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
    x, y = fashion_arrays("train", root)
    tr, va = fashion_train_val_indices(y)
    return x[tr], y[tr], x[va], y[va]


def fashion_train_val_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices, each sorted, into the official 60000-image training split."""
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(labels)), test_size=FASHION_VAL_SIZE, stratify=labels,
                              random_state=FASHION_SPLIT_SEED)
    return np.sort(tr), np.sort(va)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a stratified subset of `size` of `labels` (train_test_split, random_state=seed): the
    subset `scc finetune --images N` trains on."""
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(keep)


def fashion_subset_indices(labels: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the shipped subset in the official test split: stratified, 100 per class, fixed seed."""
    from sklearn.model_selection import train_test_split

    _, idx = train_test_split(np.arange(len(labels)), test_size=FASHION_SUBSET_SIZE, stratify=labels,
                              random_state=FASHION_SPLIT_SEED)
    return np.sort(idx)


def savez_fixed(path: Path, **arrays: np.ndarray) -> Path:
    """`np.savez_compressed` without the clock: every member carries the same fixed timestamp, so the same arrays
    (and the same zlib) give the same bytes. `np.load` reads it as any .npz."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue())
    return Path(path)


def write_fashion_subset(path: Path, root: Path | None = None) -> Path:
    """Build the shipped subset from the Debian test files: images (1000, 28, 28) uint8, labels, test indices."""
    x, y = fashion_arrays("test", root)
    idx = fashion_subset_indices(y)
    return savez_fixed(path, images=x[idx], labels=y[idx].astype(np.uint8), index=idx.astype(np.int32))


def fashion_subset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled 1000 test images: uint8 images (1000, 28, 28), labels (1000,), indices into the test split."""
    return _bundled_arrays(FASHION_SUBSET)


def fashion_train_subset_indices(labels: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the shipped fine-tuning subset in the official 60000-image training split: the
    stratified 2560 (seed 0) of the 55000 training images (the 5000 validation images excluded), exactly what
    `scc finetune --data fashion --images 2560 --seed 0` selects from the Debian files."""
    tr, _ = fashion_train_val_indices(labels)
    keep = stratified_subset(labels[tr].astype(np.int64), FASHION_TRAIN_SUBSET_SIZE, FASHION_TRAIN_SUBSET_SEED)
    return tr[keep]


def write_fashion_train_subset(path: Path, root: Path | None = None) -> Path:
    """Build the shipped fine-tuning subset from the Debian training files: images (2560, 28, 28) uint8, labels
    and indices into the official training split (`fashion_train_subset_indices`); about 1.2 MB."""
    x, y = fashion_arrays("train", root)
    idx = fashion_train_subset_indices(y)
    return savez_fixed(path, images=x[idx], labels=y[idx].astype(np.uint8), index=idx.astype(np.int32))


def fashion_train_subset() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled fine-tuning subset: uint8 images (2560, 28, 28), labels (2560,) and their indices (sorted)
    into the official training split. Needs no Debian package."""
    return _bundled_arrays(FASHION_TRAIN_SUBSET)


def _bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = asset_path(name)
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


# torchvision sets read from a local ROOT (downloads off): the class, and the keyword arguments of each split scc
# reads: "test" is what `scc eval --dataset NAME:ROOT` evaluates on, "train" what `scc finetune --data NAME:ROOT`
# trains on (the official training split, or train+val where the set defines one; never the test images)
TORCHVISION_SETS: dict[str, tuple[str, dict[str, dict]]] = {
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "stl10": ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "dtd": ("DTD", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "eurosat": ("EuroSAT", {"test": {}}),  # one folder, no official split: evaluation only
    "flowers102": ("Flowers102", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "food101": ("Food101", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "oxfordpets": ("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "fgvcaircraft": ("FGVCAircraft", {"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "country211": ("Country211", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "stanfordcars": ("StanfordCars", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "pcam": ("PCAM", {"train": {"split": "train"}, "test": {"split": "test"}}),
}


def torchvision_set(name: str, root: str, split: str = "test"):
    """(the torchvision dataset `name` under `root`, split "test" or "train", and its class names as prompts use
    them); SccError naming the problem when the set is unknown, has no such split or is not there."""
    import torchvision.datasets as tvd

    if name not in TORCHVISION_SETS:
        raise SccError(f"unknown dataset {name!r}; known: digits, fashion, fashion-full, fashion-val, imagefolder:PATH, "
                       + ", ".join(f"{k}:ROOT" for k in TORCHVISION_SETS))
    cls, splits = TORCHVISION_SETS[name]
    if split not in splits:
        raise SccError(f"torchvision's {cls} has no {split} split (one folder, its test images included); "
                       "split it yourself into folders and use imagefolder:PATH")
    try:
        ds = getattr(tvd, cls)(root, download=False, **splits[split])
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise SccError(f"dataset {name} not found under {root!r} ({err}); downloads are disabled: "
                       f"place the torchvision-format files there first") from err
    classes = [c.replace("_", " ") if name != "cifar100" else c for c in getattr(ds, "classes", [])]
    if name == "pcam":
        classes = ["healthy lymph node tissue", "lymph node tumor tissue"]
    return ds, classes


def torchvision_targets(ds) -> torch.Tensor:
    """The labels of a torchvision dataset, read from its index where it keeps one (nothing decoded), else image by
    image."""
    for attr in ("targets", "_labels", "labels"):
        labels = getattr(ds, attr, None)
        if labels is not None and len(labels) == len(ds):
            return torch.as_tensor(np.asarray(labels, dtype=np.int64))
    samples = getattr(ds, "_samples", None)  # StanfordCars: [(path, label)]
    if samples is not None and len(samples) == len(ds):
        return torch.tensor([int(label) for _, label in samples])
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def dataset_preprocess(name: str, size: int) -> Preprocess:
    """The preprocessing an integer `size` stands for in `load_dataset`: a bundled dataset's own model's rule (at
    32), otherwise the CLIP rule at that size."""
    own = {"digits": "scc-tiny-digits", "fashion": "scc-tiny-fashion", "fashion-full": "scc-tiny-fashion",
           "fashion-val": "scc-tiny-fashion"}.get(name)
    if own is not None:
        pre = preprocessing_of(own)
        if pre.size == size:
            return pre
    return Preprocess(size)


def load_dataset(spec: str, preprocess: Preprocess | int, limit: int | None = None) -> Dataset:
    """`digits` | `fashion` | `fashion-full` | `fashion-val` | `imagefolder:PATH` | `<torchvision name>:ROOT`
    -> Dataset (first `limit` images), pixels (N, 3, S, S) in [0,1].

    preprocess: the model's rule (`scc.models.preprocessing_of(model)`, or `clf.preprocess`), applied to every raw
    image; an int S stands for `dataset_preprocess(name, S)`.
    fashion: the 1000 Fashion-MNIST test images shipped with scc (stratified, 100 per class);
    fashion-full: all 10000 official test images; fashion-val: the 5000 validation images held out of the training
    split (both need the Debian package dataset-fashion-mnist).
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise SccError(f"limit must be a positive number of images or None (all), got {limit!r}")
    name, _, root = spec.partition(":")
    name = name.lower()
    pre = preprocess if isinstance(preprocess, Preprocess) else dataset_preprocess(name, int(preprocess))
    if name == "digits":
        _, _, x, y = digits_raw()
        x, y = (x[:limit], y[:limit]) if limit else (x, y)
        return Dataset("digits", pre(x), y, list(DIGIT_WORDS), ["a photo of the digit {}."])
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
        x = torch.from_numpy(np.asarray(x8)).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
        return Dataset(name, pre(x), torch.from_numpy(y8.astype(np.int64)), list(FASHION_CLASSES),
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
                imgs.append(pre.file(path))
                ys.append(label)
            except SccError as err:
                print(f"scc: skipping {err}", file=sys.stderr)
        if not imgs:
            raise SccError(f"no readable images under {folder}")
        return Dataset(f"imagefolder:{folder}", torch.stack(imgs), torch.tensor(ys), classes, TEMPLATES["imagefolder"])
    from .images import pil_to_tensor

    ds, classes = torchvision_set(name, root, "test")
    n = min(len(ds), limit) if limit else len(ds)
    imgs, ys = [], []
    for i in range(n):
        img, label = ds[i]
        imgs.append(pre(pil_to_tensor(img)))
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

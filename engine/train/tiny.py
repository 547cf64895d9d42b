"""Train a bundled tiny CLIP: `scc-tiny-digits` (default) or `scc-tiny-fashion`, on training images only.

    scc train-tiny [--dataset digits|fashion] [--epochs N] [--seed 0] [--out ./scc-tiny-out] [--replace-bundled]
    meta = scc.train.tiny.train(dataset="fashion", out=Path("scc-tiny-out"))

By default the weights go to ./scc-tiny-out/ (use them with `--pretrained scc-tiny-out/<model>.safetensors`);
only --replace-bundled overwrites the model shipped inside the installed package.

digits (`scc-tiny-digits`): images /16 -> [0,1], bilinear 8->32, 3 channels; the fixed stratified split of
`scc.data.digits_arrays` (1347 train / 450 held-out test, never trained on). Each image is paired with one of ten
training templates ("the digit {}.", ...); the evaluation template "a photo of the digit {}." is held out. open_clip
ClipLoss, AdamW lr 2e-3, wd 0.05, batch 128, one-cycle schedule, light random affine augmentation (no flips:
flipped digits change meaning), 40 epochs.

fashion (`scc-tiny-fashion`): Fashion-MNIST from the Debian package dataset-fashion-mnist. The official 60k
training split is cut into 55000 training / 5000 validation images (`scc.data.fashion_train_val`); the model sees
the 55000 only, every choice was made on the 5000, and the official test split is only scored at the end (the
1000 shipped images and all 10000). 28x28 zero-padded to 32x32; ten training templates, "a photo of a {}." held
out; ViT 32x32 patch 8 and ClipLoss as for digits, AdamW lr 5e-4, wd 0.05, batch 256, one-cycle, 4 epochs,
horizontal flips (label-preserving for clothes), no affine augmentation. Chosen on the validation images (README):
affine augmentation cost ~6 points, 48x48 input and patch 4 did worse at the same CPU budget, 10 epochs did not
help, and a class-aware contrastive loss (same-class pairs positive) matched plain ClipLoss.

One CPU thread trains such tiny steps faster than two.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import (DIGIT_WORDS, FASHION_CLASSES, digits_arrays, fashion_arrays, fashion_pixels,
                    fashion_subset_indices, fashion_train_val)
from ..models import WordTokenizer, ZeroShotClassifier, asset_path, text_embeddings

TRAIN_TEMPLATES = [
    "a photo of the number {}.", "the digit {}.", "a handwritten {}.", "a drawing of the number {}.",
    "an image of a {}.", "the number {}.", "a picture of the digit {}.", "a scan of a handwritten {}.",
    "a {}.", "a blurry photo of the number {}.",
]
EVAL_TEMPLATES = ["a photo of the digit {}."]

OPEN_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": None, "width": 64, "heads": 2, "layers": 2},
}

FASHION_TRAIN_TEMPLATES = [
    "a photo of the {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "the {}.",
    "a product photo of a {}.", "a grayscale photo of a {}.", "a low resolution photo of the {}.",
    "a small picture of the {}.", "a catalogue image of a {}.",
]
FASHION_EVAL_TEMPLATES = ["a photo of a {}."]  # held out; its words all occur in the training templates

FASHION_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": None, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class Recipe:
    """Everything that defines one bundled model's training run."""

    name: str
    labels: tuple[str, ...]
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    config: dict = field(hash=False)
    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch: int = 128
    flip: bool = False  # random horizontal flips (only where a flip keeps the label)
    max_shift: float = 0.08  # random affine: translation (fraction of the half-width), rotation (rad), scale
    max_rot: float = 0.15
    max_scale: float = 0.1


RECIPES = {
    "digits": Recipe("scc-tiny-digits", DIGIT_WORDS, tuple(TRAIN_TEMPLATES), tuple(EVAL_TEMPLATES), OPEN_CLIP_CONFIG),
    "fashion": Recipe("scc-tiny-fashion", FASHION_CLASSES, tuple(FASHION_TRAIN_TEMPLATES),
                      tuple(FASHION_EVAL_TEMPLATES), FASHION_CONFIG, epochs=4, lr=5e-4, batch=256, flip=True,
                      max_shift=0.0, max_rot=0.0, max_scale=0.0),
}


def build_vocab(recipe: Recipe | None = None) -> list[str]:
    """The sorted words of every training and evaluation prompt of a recipe (default: digits)."""
    recipe = recipe or RECIPES["digits"]
    split = WordTokenizer([], 0).split
    return sorted({w for t in recipe.train_templates + recipe.eval_templates for c in recipe.labels
                   for w in split(t.format(c))})


def random_affine(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.08, max_rot: float = 0.15,
                  max_scale: float = 0.1) -> torch.Tensor:
    """x (B, C, H, W) -> a random rotation/scale/translation of each image (zeros outside), same shape."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)
    ang, sc = u(-max_rot, max_rot), u(1 - max_scale, 1 + max_scale)
    tx, ty = u(-max_shift, max_shift) * 2, u(-max_shift, max_shift) * 2
    theta = torch.stack([torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang), tx], -1),
                         torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), ty], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


DEFAULT_OUT = Path("scc-tiny-out")


def bundled_dir() -> Path:
    """The installed package's assets folder (where --replace-bundled writes)."""
    return asset_path("x").parent


def _splits(dataset: str, size: int):
    """(train batch fn(idx) -> (B,3,S,S), y_train, {split name: (x, y)} for evaluation, split description)."""
    if dataset == "digits":
        xtr, ytr, xte, yte = digits_arrays(size)
        return (lambda idx: xtr[idx]), ytr, {"held_out": (xte, yte)}, \
            "sklearn load_digits, train_test_split(test_size=450, stratify=y, random_state=0)"
    xtr8, ytr8, xva8, yva8 = fashion_train_val()
    xtr8 = torch.from_numpy(xtr8)
    evals = {"validation": (fashion_pixels(xva8, size), torch.from_numpy(yva8.astype("int64")))}
    split = ("Fashion-MNIST (Debian dataset-fashion-mnist): official train split cut by train_test_split("
             "test_size=5000, stratify=y, random_state=0) into 55000 train / 5000 validation; held-out test = the "
             "1000 shipped official test images (train_test_split(test_size=1000, stratify=y, random_state=0)); "
             "test_full = all 10000 official test images")
    return (lambda idx: fashion_pixels(xtr8[idx], size)), torch.from_numpy(ytr8.astype("int64")), evals, split


def fashion_test_accuracy(clf) -> dict:
    """Scored once, after every choice was made: accuracy on the 1000 shipped test images and on all 10000."""
    x8, y8 = fashion_arrays("test")
    x, y = fashion_pixels(x8, clf.image_size), torch.from_numpy(y8.astype("int64"))
    sub = torch.from_numpy(fashion_subset_indices(y8))
    return {"held_out_clean_accuracy": round(accuracy(clf, x[sub], y[sub]), 4),
            "test_full_accuracy": round(accuracy(clf, x, y), 4)}


@torch.no_grad()
def accuracy(clf, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of a classifier on (N, 3, S, S) pixels."""
    correct = sum((clf(x[i: i + batch]).argmax(1) == y[i: i + batch]).sum().item() for i in range(0, len(y), batch))
    return correct / len(y)


def train(epochs: int | None = None, seed: int = 0, out: Path | None = None, verbose: bool = True,
          dataset: str = "digits", recipe: Recipe | None = None, with_test: bool = True) -> dict:
    """Train one bundled model and write <name>.json, <name>.safetensors, <name>.meta.json into `out`.

    `recipe` overrides the dataset's recipe (experiments); `with_test=False` never touches the test split.
    Returns the meta dict (accuracies on every evaluated split).
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file


    recipe = recipe or RECIPES[dataset]
    epochs = recipe.epochs if epochs is None else epochs
    name = recipe.name
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    words = build_vocab(recipe)
    tok = WordTokenizer(words, recipe.config["text_cfg"]["context_length"], name)
    cfg = json.loads(json.dumps(recipe.config))
    cfg["text_cfg"]["vocab_size"] = tok.vocab_size
    size = cfg["vision_cfg"]["image_size"]
    out = Path(out) if out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(out / f"{name}.json")
    model = open_clip.create_model(name, pretrained=None)

    batch_images, ytr, evals, split = _splits(dataset, size)
    # (10 classes, 10 templates, context) token table; a batch picks one template per image
    tokens = torch.stack([tok([t.format(c) for t in recipe.train_templates]) for c in recipe.labels])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    batch, n = recipe.batch, len(ytr)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)

    def classifier():
        return ZeroShotClassifier(model.visual, text_embeddings(model, tok, recipe.labels, recipe.eval_templates),
                                  model.logit_scale.exp().item(), size, recipe.labels)

    t0 = time.time()
    history = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i: i + batch]
            img = batch_images(idx)
            if recipe.max_shift or recipe.max_rot or recipe.max_scale:
                img = random_affine(img, gen, recipe.max_shift, recipe.max_rot, recipe.max_scale).clamp(0, 1)
            if recipe.flip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                img = torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img)
            img = (img - mean) / std
            tmpl = torch.randint(len(recipe.train_templates), (len(idx),), generator=gen)
            txt = tokens[ytr[idx], tmpl]
            img_f = F.normalize(model.encode_image(img), dim=-1)
            txt_f = F.normalize(model.encode_text(txt), dim=-1)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        if dataset != "digits":  # validation accuracy after every epoch (the split every choice was made on)
            model.eval()
            val = accuracy(classifier(), *evals["validation"])
            model.train()
            history.append(round(val, 4))
            if verbose:
                print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} validation {val:.4f} ({time.time() - t0:.0f}s)",
                      flush=True)
        elif verbose and (epoch % 10 == 9 or epoch == epochs - 1):
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    train_seconds = round(time.time() - t0, 1)
    model.eval()
    clf = classifier()
    accs = {f"{split_name}_accuracy": round(accuracy(clf, x, y), 4) for split_name, (x, y) in evals.items()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"))
    meta = {"words": words, "context_length": tok.context_length, "labels": list(recipe.labels),
            "train_templates": list(recipe.train_templates), "eval_templates": list(recipe.eval_templates),
            "recipe": {"epochs": epochs, "seed": seed,
                       "optimizer": f"AdamW lr {recipe.lr:.0e} wd {recipe.weight_decay:g} one-cycle".replace("e-0", "e-"),
                       "batch": batch},
            "train_s": train_seconds, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}
    if dataset == "digits":
        meta["recipe"]["split"] = split
        meta["held_out_clean_accuracy"] = accs["held_out_accuracy"]
        meta = {k: meta[k] for k in ("words", "context_length", "labels", "train_templates", "eval_templates",
                                      "recipe", "held_out_clean_accuracy", "train_s", "threads", "params")}
    else:
        meta["recipe"].update({
            "dataset": dataset, "split": split, "image": "28x28 uint8 /255, zero-padded to 32x32, 3 channels",
            "augmentation": (f"random affine (shift {recipe.max_shift}, rotation {recipe.max_rot} rad, scale "
                             f"{recipe.max_scale})" if recipe.max_shift or recipe.max_rot or recipe.max_scale
                             else "no affine") + (", horizontal flip p=0.5" if recipe.flip else ""),
            "loss": "open_clip ClipLoss, one random training template per image", "threads": 1})
        meta["validation_accuracy"] = accs["validation_accuracy"]
        meta["validation_history"] = history
        if with_test:
            accs.update(fashion_test_accuracy(clf))
            meta.update(held_out_clean_accuracy=accs["held_out_clean_accuracy"],
                        test_full_accuracy=accs["test_full_accuracy"])
    (out / f"{name}.meta.json").write_text(json.dumps(meta, indent=2))
    if verbose:
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in accs.items())
              + f", {meta['params']} params, {train_seconds:.0f}s, saved to {out}")
    return meta

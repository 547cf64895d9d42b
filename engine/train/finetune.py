"""Fine-tuning a CLIP vision encoder: CLIP-FT, TeCoA, PMG-AFT and FARE, the fine-tuned columns of TTC's and SCC's
Table 1. Only the image tower f_theta is trained; the text tower, the class text embeddings T (C x D,
L2-normalised, from the training prompts) and the logit scale s stay fixed. f_0 is a frozen copy of the original
image tower; P(z) = softmax(s * cos(z, T)).

    CLIP-FT   L = CE(s cos(f_theta(x), T), y)                                             clean images, no attack
    TeCoA     L = CE(s cos(f_theta(x_adv), T), y),   x_adv = PGD_CE(x, y)                 (Mao et al., ICLR 2023)
    PMG-AFT   L = CE(P_theta(x_adv), y) + w1 KL(P_0(x_adv) || P_theta(x_adv)) + w2 KL(P_theta(x) || P_theta(x_adv)),
              x_adv = PGD_CE(x, y)                                                        (Wang et al., CVPR 2024)
    FARE      L = mean_b || f_theta(x_adv) - f_0(x) ||_2^2,  x_adv = PGD maximising the same loss
              (unnormalised embeddings, no labels, no text)                                (Schlarmann et al., ICML 2024)

    PGD (inner attack): delta_0 = Pi(eps * u), u ~ U(-1, 1);  delta <- Pi(delta + alpha * sign(v)),
              v = sign(grad) (TeCoA, PMG-AFT), or v = sign(mu v + sign(grad)) with mu = 0.9 (FARE's momentum);
              Pi = projection onto the l_inf eps-ball and [0, 1].

    train = scc.train.finetune.finetune("scc-tiny-digits", "tecoa", data="digits", out=Path("robust/"))
    scc finetune --method tecoa --eps 1/255 --data digits --out robust/     (torchrun --nproc-per-node 2 scc ...)

Settings read in each method's official code (the rest is inferred and a config field):
- TeCoA (cvlab-columbia/ZSRobust4FoundationModel): the CE over all class prompts, vision encoder only, PGD with a
  uniform start, sign steps and a [0,1] clamp, eps = step = 1/255 and 2 steps (README), SGD momentum 0.9, warm-up
  then cosine. Its default learning rate (1e-7 for ViT-B/32 on ImageNet) does not move a tiny model: the testbed
  schedule below is ours.
- PMG-AFT (the official PMG_AFT.py): the three terms, the frozen original P_0, TeCoA's inner attack, and the
  reduction: nn.KLDivLoss(reduction='sum') sums the KL terms over the batch while the CE is a batch mean
  (`reduction="official"`, the default; `"mean"` takes batch means of all three). The clean branch is not
  detached. The weights w1 = w2 = 1 are inferred.
- FARE (chs20/RobustVLM): the squared L2 of unnormalised embeddings summed over dimensions and averaged over the
  batch, PGD maximising it (10 steps, step 1/255, momentum 0.9 on sign-normalised gradients, uniform start, clamp),
  AdamW with weight decay 1e-4, warm-up then cosine.
- CLIP-FT: TTC ships no code for it; clean cross-entropy fine-tuning with TeCoA's optimiser is inferred.

Presets are named after the source: `<method>` (= preset `eps1`, the Table 1 models: eps_train 1/255) and
`<method>-eps4` (eps_train 4/255; PGD 5 steps of 1/255 for TeCoA and PMG-AFT, inferred). CLIP-FT has no attack and
one preset. The schedule (epochs, batch, learning rate, warm-up) is a testbed schedule for the tiny models, written
in every preset and overridable.

Distributed: under `torchrun --nproc-per-node N` (environment WORLD_SIZE > 1) the vision encoder is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA). Every rank draws the same permutation and the same attack
starts for the whole global batch (from (seed, epoch, step)) and keeps its contiguous share, so N processes with
global batch B compute what one process does with batch B, up to the order of floating-point sums. Sum-reduced
terms (PMG-AFT's official KL) are multiplied by N before DDP averages the gradients, which keeps them sums over the
global batch.

Resume: after every epoch the state (weights, optimiser, schedule, losses) goes to `<stem>.resume.pt` in the
output folder; the same command started again continues from it. It is read with torch.load(weights_only=True)
(tensors, dicts, lists and numbers), so a file that would unpickle anything else is refused, never run. The
finished run writes `<stem>.safetensors` (a whole open_clip state dict: `--pretrained PATH` loads it in every
command) and `<stem>.meta.json` (method, eps, steps, data, seed, versions, per-epoch losses), and deletes the resume
file. Each file is written under a temporary name and moved into place whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..draws import derive_seed
from ..errors import SccError
from ..perturbation import project

METHODS = ("clip-ft", "tecoa", "pmg-aft", "fare")
SOURCES = {
    "clip-ft": "inferred: clean cross-entropy fine-tuning (TTC's Table 1 column; TTC ships no code for it)",
    "tecoa": "Mao et al., ICLR 2023; cvlab-columbia/ZSRobust4FoundationModel finetuning.py",
    "pmg-aft": "Wang et al., CVPR 2024; the official PMG_AFT.py",
    "fare": "Schlarmann et al., ICML 2024; chs20/RobustVLM train/adversarial_training_clip.py, train/pgd_train.py",
}
REDUCTIONS = ("official", "mean")


@dataclass(frozen=True)
class FinetuneConfig:
    method: str
    eps: float = 1 / 255  # eps_train: the inner attack's l_inf radius (pixels); 0 for CLIP-FT
    attack_steps: int = 2  # inner PGD steps
    attack_alpha: float = 1 / 255  # inner PGD step
    attack_momentum: float = 0.0  # FARE: 0.9 (sign of mu * v + sign(grad))
    reduction: str = "official"  # PMG-AFT: official = KL summed over the batch, CE averaged; mean = all averaged
    kl_weights: tuple[float, float] = (1.0, 1.0)  # PMG-AFT: w1 (to the original), w2 (clean to adversarial)
    optimizer: str = "sgd"  # sgd (momentum) | adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the optimiser steps with a linear warm-up, then cosine to 0
    epochs: int = 10
    batch: int = 128  # the global batch (all processes together)

    def __post_init__(self):
        if self.method not in METHODS:
            raise SccError(f"unknown fine-tuning method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 0 <= self.eps <= 1:
            raise SccError(f"eps is a radius in pixels of [0, 1], got eps={self.eps}; write 1/255 or 4/255 (--eps "
                           "1/255), not 1 or 4")
        if self.method != "clip-ft":
            if self.eps <= 0:
                raise SccError(f"{self.method} trains on attacked images and needs eps > 0, got eps={self.eps}; give "
                               "eps=1/255 or 4/255 (clip-ft is the method without an attack)")
            if self.attack_steps < 1:
                raise SccError(f"{self.method}'s inner attack needs attack_steps >= 1, got attack_steps="
                               f"{self.attack_steps}; give the preset's (leave it out) or a positive count")
            if self.attack_alpha <= 0:
                raise SccError(f"{self.method}'s inner attack needs a step attack_alpha > 0, got attack_alpha="
                               f"{self.attack_alpha}; give the preset's 1/255 (leave it out) or another positive step")
        if self.reduction not in REDUCTIONS:
            raise SccError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise SccError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.lr <= 0:
            raise SccError(f"the learning rate must be > 0, got lr={self.lr}; give a positive --lr or leave it out "
                           "for the preset's")
        if self.epochs < 1:
            raise SccError(f"training needs at least one epoch, got epochs={self.epochs}; give --epochs 1 or more")
        if self.batch < 1:
            raise SccError(f"the global batch must be at least 1, got batch={self.batch}; give --batch-size 1 or more")
        if not 0 <= self.warmup < 1:
            raise SccError(f"warmup is the fraction of the optimiser steps spent warming up, got warmup={self.warmup}; "
                           "give a value in [0, 1) (the presets use 0.1)")


# The testbed schedule (tiny models, ~1-2k training images): 10 epochs of batch 128, 10 % warm-up, cosine.
_SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0)
_ADAMW = dict(optimizer="adamw", lr=1e-4, weight_decay=1e-4)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "clip-ft": {"eps1": dict(eps=0.0, attack_steps=0, **_SGD)},
    "tecoa": {"eps1": dict(eps=1 / 255, attack_steps=2, **_SGD),
              "eps4": dict(eps=4 / 255, attack_steps=5, **_SGD)},
    # the official reduction sums the KL terms over the batch (x128 against a mean): at TeCoA's 1e-2 the tiny
    # model diverges to chance (measured, as at 5e-4); 1e-4 trains
    "pmg-aft": {"eps1": dict(eps=1 / 255, attack_steps=2, **{**_SGD, "lr": 1e-4}),
                "eps4": dict(eps=4 / 255, attack_steps=5, **{**_SGD, "lr": 1e-4})},
    "fare": {"eps1": dict(eps=1 / 255, attack_steps=10, attack_momentum=0.9, **_ADAMW),
             "eps4": dict(eps=4 / 255, attack_steps=10, attack_momentum=0.9, **_ADAMW)},
}


def method_labels() -> list[str]:
    """'clip-ft', 'tecoa', 'tecoa-eps4', ...: the bare name is the eps1 preset (Table 1's eps_train 1/255)."""
    return [m if p == "eps1" else f"{m}-{p}" for m in METHODS for p in PRESETS[m]]


def parse_method(label: str) -> tuple[str, str]:
    """'tecoa' -> ('tecoa', 'eps1'); 'fare-eps4' -> ('fare', 'eps4'); SccError listing the valid labels."""
    text = str(label).strip().lower()
    for method in sorted(METHODS, key=len, reverse=True):
        if text == method:
            return method, "eps1"
        if text.startswith(method + "-") and text[len(method) + 1:] in PRESETS[method]:
            return method, text[len(method) + 1:]
    raise SccError(f"unknown fine-tuned model {label!r}; choose from {', '.join(method_labels())}")


def method_label(method: str, preset: str) -> str:
    return method if preset == "eps1" else f"{method}-{preset}"


def make_config(method: str, preset: str = "eps1", **overrides) -> FinetuneConfig:
    """The frozen config of `method` under `preset`, with the caller's overrides (None values ignored)."""
    if method not in PRESETS:
        raise SccError(f"unknown fine-tuning method {method!r}; choose from {', '.join(METHODS)}")
    if preset not in PRESETS[method]:
        raise SccError(f"unknown preset {preset!r} for {method}; choose from {sorted(PRESETS[method])}")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SccError(f"fine-tuning has no setting(s) {unknown}; settings: {sorted(fields - {'method'})}")
    values = {**PRESETS[method][preset], **{k: v for k, v in overrides.items() if v is not None}}
    return FinetuneConfig(method=method, **values)


# ----------------------------------------------------------------------------------------------------------
# The losses and the inner attack (pure functions of the towers, the pixels and the draws)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Towers:
    """What the losses need: the trained image tower, the frozen original, normalisation, text, scale."""
    visual: nn.Module  # f_theta (possibly wrapped in DistributedDataParallel)
    frozen: nn.Module  # f_0
    mean: torch.Tensor
    std: torch.Tensor
    text: torch.Tensor  # (C, D), L2-normalised
    scale: float

    def embed(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        return (module or self.visual)((x - self.mean) / self.std)

    def logits(self, e: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(e, dim=-1) @ self.text.t()


def pgd_train(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, start: torch.Tensor,
              cfg: FinetuneConfig) -> torch.Tensor:
    """The inner attack: x_adv maximising loss_fn (a sum over the batch, so each image's gradient is its own)."""
    delta = project(cfg.eps * start, x, cfg.eps)
    velocity = torch.zeros_like(x)
    for _ in range(cfg.attack_steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(loss_fn(x + delta), delta)
        step = grad.sign().nan_to_num(0.0)
        if cfg.attack_momentum:
            velocity = (cfg.attack_momentum * velocity + step).sign()
            step = velocity
        delta = project(delta.detach() + cfg.attack_alpha * step, x, cfg.eps)
    return (x + delta).detach()


def attack_loss(towers: Towers, cfg: FinetuneConfig, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss the inner attack maximises (summed over the batch), on the unwrapped image tower."""
    raw = getattr(towers.visual, "module", towers.visual)
    if cfg.method == "fare":
        return lambda z: ((towers.embed(z, raw) - target) ** 2).sum()
    return lambda z: F.cross_entropy(towers.logits(towers.embed(z, raw)), y, reduction="sum")


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities, (B,)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def training_loss(towers: Towers, cfg: FinetuneConfig, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                  world: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's loss on one (local) batch and its parts. `world` processes: sum-reduced terms are scaled by
    it so that DDP's gradient average leaves the global batch's sum."""
    if cfg.method == "clip-ft":
        loss = F.cross_entropy(towers.logits(towers.embed(x)), y)
        return loss, {"loss": loss.item(), "ce": loss.item()}
    target = None
    if cfg.method == "fare":
        with torch.no_grad():
            target = towers.embed(x, towers.frozen)
    was_training = towers.visual.training
    towers.visual.eval()
    x_adv = pgd_train(attack_loss(towers, cfg, x, y, target), x, start, cfg)
    towers.visual.train(was_training)
    if cfg.method == "fare":
        loss = ((towers.embed(x_adv) - target) ** 2).sum(-1).mean()
        return loss, {"loss": loss.item(), "l2": loss.item()}
    if cfg.method == "tecoa":
        loss = F.cross_entropy(towers.logits(towers.embed(x_adv)), y)
        return loss, {"loss": loss.item(), "ce": loss.item()}
    # PMG-AFT: one forward of the tuned tower on [x_adv; x] (one DDP forward per step), one of the frozen one
    e_adv, e_clean = towers.embed(torch.cat([x_adv, x])).split(len(x))
    log_adv, log_clean = F.log_softmax(towers.logits(e_adv), -1), F.log_softmax(towers.logits(e_clean), -1)
    with torch.no_grad():
        log_orig = F.log_softmax(towers.logits(towers.embed(x_adv, towers.frozen)), -1)
    ce = F.nll_loss(log_adv, y)
    kl_orig, kl_clean = kl(log_orig, log_adv), kl(log_clean, log_adv)  # (B,)
    # official: summed over the batch (nn.KLDivLoss(reduction='sum')); scaled by `world`, DDP's gradient average
    # leaves the sum over the global batch
    factor = len(x) * world if cfg.reduction == "official" else 1
    w1, w2 = cfg.kl_weights
    loss = ce + factor * (w1 * kl_orig.mean() + w2 * kl_clean.mean())
    parts = {"ce": ce.item(), "kl_original": kl_orig.mean().item(), "kl_clean": kl_clean.mean().item()}
    # the objective's value over the global batch (per-image KL means average correctly over processes)
    parts["loss"] = parts["ce"] + factor * (w1 * parts["kl_original"] + w2 * parts["kl_clean"])
    return loss, parts


# ----------------------------------------------------------------------------------------------------------
# Training data: the bundled testbeds' TRAINING splits, image folders, torchvision sets' training splits
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    spec: str
    batch: Callable[[torch.Tensor], torch.Tensor]  # indices -> pixels (B, 3, S, S) in [0, 1]
    targets: torch.Tensor
    classes: list[str]
    templates: list[str] | None  # the dataset's prompts (None: the model's own training prompts)
    description: str

    def __len__(self) -> int:
        return len(self.targets)


DATA_SPECS = "digits | fashion | imagefolder:PATH | <torchvision name>:ROOT"


def training_data(spec: str, preprocess, images: int | None = None, seed: int = 0) -> TrainingData:
    """The training images of `spec`: `digits` (the 1347 training digits; the 450 held-out ones are never used),
    `fashion` (the 55000 training images of Fashion-MNIST's training split, validation and test excluded; needs the
    Debian package dataset-fashion-mnist, but for the bundled subset below), `imagefolder:PATH` (one sub-folder per
    class), `<torchvision name>:ROOT` (the set's training split from a local ROOT, scc.data.TORCHVISION_SETS: the
    split `scc eval --dataset NAME:ROOT` tests on is never read; images are decoded batch by batch, so a large set
    is not held in memory). `images`: a stratified subset of that many (fixed by `seed`).

    `fashion` with images=2560 and seed=0 (the robust testbed models' subset) reads the subset bundled with scc
    (scc.data.fashion_train_subset): the same images in the same order as that subset of the Debian files, so
    it trains to the same bytes with or without the package."""
    from ..data import (DIGIT_WORDS, FASHION_APT, FASHION_CLASSES, FASHION_DIR, FASHION_TRAIN_SUBSET,
                        FASHION_TRAIN_SUBSET_SEED, FASHION_TRAIN_SUBSET_SIZE, TEMPLATES, TORCHVISION_SETS, digits_raw,
                        fashion_train_subset, fashion_train_val, load_dataset, stratified_subset, torchvision_set,
                        torchvision_targets)
    from ..images import pil_to_tensor
    from ..models import asset_path

    name, _, root = str(spec).partition(":")
    name = name.strip().lower()
    subset = None  # a description of the subset taken below, or of the bundled one
    if name == "digits" and not root:
        x, y, _, _ = digits_raw()
        pix, desc = preprocess(x), "digits training split (1347 of sklearn's 1797; the 450 held-out never used)"
        data = TrainingData("digits", lambda idx: pix[idx], y, list(DIGIT_WORDS), None, desc)
    elif name == "fashion" and not root:
        bundled = (images, seed) == (FASHION_TRAIN_SUBSET_SIZE, FASHION_TRAIN_SUBSET_SEED) \
            and asset_path(FASHION_TRAIN_SUBSET).is_file()
        if bundled:
            x8, y8, _ = fashion_train_subset()
            subset, images = _subset_text(images, seed), None
        else:
            try:
                x8, y8, _, _ = fashion_train_val()
            except SccError as err:
                raise SccError(f"Fashion-MNIST's training split is not installed ({FASHION_DIR}): run `{FASHION_APT}`; "
                               f"without it `--data fashion` trains on the {FASHION_TRAIN_SUBSET_SIZE} training "
                               f"images bundled with scc: --images {FASHION_TRAIN_SUBSET_SIZE} --seed "
                               f"{FASHION_TRAIN_SUBSET_SEED} (given: --images {images or 'all'}, --seed {seed})") from err
        x8 = torch.from_numpy(x8)
        to_pix = lambda idx: preprocess(x8[idx].float().div(255.0)[:, None].expand(-1, 3, -1, -1))
        data = TrainingData("fashion", to_pix, torch.from_numpy(y8.astype(np.int64)), list(FASHION_CLASSES), None,
                            "Fashion-MNIST training split (55000 images; the 5000 validation and the test split "
                            "never used)")
    elif name == "imagefolder" and root:
        ds = load_dataset(spec, preprocess)
        pix = ds.images
        data = TrainingData(ds.name, lambda idx: pix[idx], ds.targets, ds.classes, ds.templates,
                            f"image folder {root} ({len(ds.targets)} images)")
    elif name in TORCHVISION_SETS and root:
        ds, classes = torchvision_set(name, root, "train")
        targets = torchvision_targets(ds)

        def decode(idx: torch.Tensor) -> torch.Tensor:  # (B,) indices -> (B, 3, S, S)
            return torch.stack([preprocess(pil_to_tensor(ds[int(i)][0])) for i in idx])

        data = TrainingData(name, decode, targets, classes, list(TEMPLATES.get(name, TEMPLATES["imagefolder"])),
                            f"torchvision {type(ds).__name__} training split under {root} ({len(targets)} images; "
                            "its test split never used)")
    else:
        raise SccError(f"unknown training data {spec!r}; choose from {DATA_SPECS} (the bundled testbeds' training "
                       "splits, a folder with one sub-folder per class, or a torchvision set's training split: "
                       f"{', '.join(k for k, (_, splits) in TORCHVISION_SETS.items() if 'train' in splits)})")
    if images is not None:
        if images < len(data.classes) or images > len(data):
            raise SccError(f"--images must be between {len(data.classes)} and {len(data)} for {spec}, got {images}")
        if images < len(data):
            keep = torch.from_numpy(stratified_subset(data.targets.numpy(), images, seed))
            inner = data.batch
            data = TrainingData(data.spec, lambda idx: inner(keep[idx]), data.targets[keep], data.classes,
                                data.templates, f"{data.description}; {_subset_text(images, seed)}")
    if subset is not None:
        data.description = f"{data.description}; {subset}"
    return data


def _subset_text(images: int, seed: int) -> str:
    return f"a stratified subset of {images} (train_test_split random_state={seed})"


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The scc modules whose code the training loop runs (this file, the projection, the seed derivation). What else
# decides the weights reaches the loop as tensors (the pixels, the labels, the initial model: `starting_point`) or
# comes from a library (`library_versions`).
TRAINING_MODULES = ("scc.train.finetune", "scc.perturbation", "scc.draws")


def code_hash() -> str:
    """A hash of the source of TRAINING_MODULES, each module's file as it is on disk: a cached model is rebuilt
    when any of them changes."""
    import importlib

    h = hashlib.sha256()
    for name in TRAINING_MODULES:
        h.update(name.encode() + b"\0" + Path(importlib.import_module(name).__file__).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """The libraries whose code computes or writes the weights (torch, open_clip, numpy, safetensors), and the
    CPU kernels torch dispatches to (the machine and its vector extension): each can change the bytes."""
    import importlib.metadata as md
    import platform

    out = {"torch": torch.__version__}
    for key, package in (("open_clip", "open_clip_torch"), ("numpy", "numpy"), ("safetensors", "safetensors")):
        try:
            out[key] = md.version(package)
        except md.PackageNotFoundError:
            out[key] = "absent"
    out["cpu"] = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype} {tuple(t.shape)}".encode() + b"\0" + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def starting_point(model: str, data: str, pretrained: str | None = None, images: int | None = None,
                   seed: int = 0) -> dict[str, str]:
    """sha256 of what a run starts from, built by the functions the run builds it with: the training pixels and
    labels in their order (scc.data, the stratified subset, the model's preprocessing) and the initial model (every
    tensor of the whole CLIP, the class text embeddings from the training prompts, the logit scale and the
    normalisation). Any change to the data, its split or preprocessing, the weights or their loading changes it."""
    dataset = _training_set(model, data, images, seed)
    h = hashlib.sha256()
    for lo in range(0, len(dataset), 1024):
        h.update(_tensor_bytes(dataset.batch(torch.arange(lo, min(lo + 1024, len(dataset))))))
    h.update(_tensor_bytes(dataset.targets))
    clf, _ = _initial_model(model, pretrained, dataset, "cpu", seed)
    m = hashlib.sha256()
    for name, tensor in sorted(clf.clip.state_dict().items()):
        m.update(name.encode() + b"\0" + _tensor_bytes(tensor))
    for tensor in (clf.text, clf.mean, clf.std, torch.tensor(clf.logit_scale, dtype=torch.float64)):
        m.update(_tensor_bytes(tensor))
    return {"data_sha256": h.hexdigest(), "model_sha256": m.hexdigest()}


def stem_of(model: str, method: str, preset: str) -> str:
    """The output files' stem: 'scc-tiny-digits-tecoa'; a `local-dir:` model by its folder's name."""
    if model.startswith("local-dir:"):
        model = Path(model[len("local-dir:"):]).name or "local-dir"
    base = model.replace("hf-hub:", "").replace("/", "-").replace(":", "-")
    return f"{base}-{method_label(method, preset)}"


def _schedule(step: int, total: int, warmup: float) -> float:
    warm = int(round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def finetune(model: str = "scc-tiny-digits", method: str = "tecoa", preset: str = "eps1", data: str = "digits",
             out: str | Path = "finetune-out", pretrained: str | None = None, seed: int = 0,
             images: int | None = None, device: str = "cpu", progress: bool = True,
             log: Callable[[str], None] | None = None, keep: Callable | None = None, max_steps: int | None = None,
             meta_extra: dict | None = None, **overrides) -> dict:
    """Fine-tune `model`'s vision encoder with `method` and write `<stem>.safetensors` + `<stem>.meta.json` to
    `out`; returns the meta dict. `overrides`: FinetuneConfig fields (epochs, batch, lr, ...). `max_steps` stops
    after that many optimiser steps in all (tests); `keep(snapshot)` registers the interrupt snapshot
    (scc.cli.interrupts); `meta_extra` adds fields to the meta file (the robust cache's key). Under torchrun every
    rank calls it; rank 0 writes; the process group is set up and torn down here (gloo on CPU, nccl on CUDA) unless
    the caller made one. Every file is written to a temporary name and moved into place whole (os.replace)."""
    _, world = _world()
    owned = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
            owned = True
    try:
        return _finetune(model, method, preset, data, out, pretrained, seed, images, device, progress, log, keep,
                         max_steps, meta_extra, **overrides)
    finally:
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _training_set(model: str, data: str, images: int | None, seed: int) -> TrainingData:
    from ..models import preprocessing_of

    return training_data(data, preprocessing_of(model), images, seed)


def _initial_model(model: str, pretrained: str | None, dataset: TrainingData, device: str, seed: int):
    """(the classifier a run starts from, its prompts): the class text embeddings come from a bundled model's
    training prompts (its word vocabulary covers its own prompts only; its evaluation prompt stays held out), or
    the dataset's prompts for any other model."""
    from ..models import bundled_meta, is_bundled, load

    if is_bundled(model):
        templates = bundled_meta(model)["train_templates"]
    else:
        templates = dataset.templates or ["a photo of a {}."]
    clf = load(model, pretrained, labels=dataset.classes, templates=templates, device=device, seed=seed)
    return clf, templates


def _write_whole(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(temporary path)`, then os.replace onto `path`: a reader sees the whole file or the previous one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_resume(path: Path, device: str) -> dict:
    """The resume state: plain tensors, dicts, lists and numbers, read with weights_only=True, so a file that would
    need to unpickle anything else (code) is refused, not run."""
    import pickle

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SccError(f"{path} is not a resume file that scc wrote ({reason}); delete it to start the run "
                       "over") from None
    if not isinstance(state, dict):
        raise SccError(f"{path} is not a resume file that scc wrote (it holds a {type(state).__name__}); delete it "
                       "to start the run over")
    return state


def _finetune(model, method, preset, data, out, pretrained, seed, images, device, progress, log, keep, max_steps,
              meta_extra, **overrides) -> dict:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..models import is_bundled
    from ..provenance import versions

    cfg = make_config(method, preset, **overrides)
    rank, world = _world()
    if cfg.batch % world:
        raise SccError(f"the global batch {cfg.batch} must be divisible by the {world} processes")
    say = (lambda line: log(line)) if log is not None and rank == 0 else (lambda line: None)
    out = Path(out)
    dataset = _training_set(model, data, images, seed)
    n = len(dataset)
    if n < cfg.batch:
        raise SccError(f"{n} training images are fewer than one batch of {cfg.batch}; lower --batch-size")
    clf, templates = _initial_model(model, pretrained, dataset, device, seed)
    clip = clf.clip
    visual = clip.visual
    frozen = _frozen_copy(visual)
    visual.requires_grad_(True).train()
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(visual)
    towers = Towers(ddp or visual, frozen, clf.mean, clf.std, clf.text, clf.logit_scale)
    params = [p for p in visual.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = n // cfg.batch  # whole global batches (drop the remainder; a new permutation every epoch)
    total = per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, cfg.warmup))
    stem = stem_of(model, method, preset)
    resume_path = out / f"{stem}.resume.pt"
    identity = {"model": model, "pretrained": pretrained, "method": method, "preset": preset, "data": data,
                "images": images, "seed": seed, "config": _jsonable(dataclasses.asdict(cfg))}
    history: list[dict] = []
    start_epoch = 0
    if resume_path.is_file():
        state = _read_resume(resume_path, device)
        if state.get("identity") != identity:
            raise SccError(f"{resume_path} belongs to another run ({_diff(state.get('identity'), identity)}); give "
                           "another --out or delete it")
        visual.load_state_dict(state["visual"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        history, start_epoch = state["history"], state["epoch"]
        say(f"resuming {stem} after epoch {start_epoch} of {cfg.epochs} ({resume_path})")
    meta = {"model": model, "pretrained": pretrained, "method": method, "label": method_label(method, preset),
            "preset": preset, "source": SOURCES[method], "eps": cfg.eps, "eps_255": round(cfg.eps * 255, 4),
            "attack_steps": cfg.attack_steps if method != "clip-ft" else 0, "config": _jsonable(dataclasses.asdict(cfg)),
            "data": data, "data_description": dataset.description, "n_images": n, "images": images,
            "classes": dataset.classes, "templates": list(templates), "seed": seed, "world_size": world,
            "global_batch": cfg.batch, "steps_per_epoch": per_epoch, "optimizer_steps": total,
            "trained": "vision encoder only", "threads": torch.get_num_threads(), "versions": versions(),
            "code_hash": code_hash()}
    if pretrained is None and is_bundled(model):
        from ..models import asset_path
        meta["base_weights_sha256"] = file_sha256(asset_path(f"{model}.safetensors"))

    def snapshot():
        return ({**meta, "epochs": history, "resume": str(resume_path)}, len(history), cfg.epochs,
                [f"epoch {e + 1}" for e in range(len(history), cfg.epochs)])

    if keep is not None:
        keep(snapshot)
    lo_share, hi_share = rank * cfg.batch // world, (rank + 1) * cfg.batch // world
    steps_done = start_epoch * per_epoch
    t_run = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, f"epoch:{epoch}")))
        sums: dict[str, float] = {}
        bar = tqdm(range(per_epoch), desc=f"{method_label(method, preset)} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank != 0, leave=False)
        for step in bar:
            idx = perm[step * cfg.batch:(step + 1) * cfg.batch]
            gen = torch.Generator().manual_seed(derive_seed(seed, f"start:{epoch}:{step}"))
            share = idx[lo_share:hi_share]  # this process decodes only its own images
            x = dataset.batch(share).to(device)
            # U(-1, 1) for the whole global batch (B, 3, S, S), so every process draws the same numbers
            start_all = torch.rand((len(idx), *x.shape[1:]), generator=gen) * 2 - 1
            y = dataset.targets[share].to(device)
            loss, parts = training_loss(towers, cfg, x, y, start_all[lo_share:hi_share].to(device), world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps_done += 1
            parts = _global_mean(parts, world)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if max_steps is not None and steps_done >= max_steps:
                break
        bar.close()
        done = step + 1
        history.append({"epoch": epoch + 1, **{k: round(v / done, 6) for k, v in sums.items()},
                        "lr_end": sched.get_last_lr()[0], "epoch_s": round(time.time() - t0, 2)})
        if rank == 0:  # the epoch is kept before it is announced
            out.mkdir(parents=True, exist_ok=True)
            state = {"identity": identity, "visual": visual.state_dict(), "optimizer": opt.state_dict(),
                     "schedule": sched.state_dict(), "history": history, "epoch": epoch + 1}
            _write_whole(resume_path, lambda tmp: torch.save(state, tmp))
        _barrier(world)
        say(f"{stem} epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()
                                                                   if k not in ("epoch", "lr_end", "epoch_s"))
            + f" ({history[-1]['epoch_s']:.1f} s)")
        if max_steps is not None and steps_done >= max_steps:
            break
    meta["epochs"] = history
    meta["train_s"] = round(sum(h["epoch_s"] for h in history), 2)
    meta["wall_s_this_run"] = round(time.time() - t_run, 2)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
        weights = out / f"{stem}.safetensors"
        _write_whole(weights, lambda tmp: save_file(state, str(tmp)))
        meta["checkpoint"] = weights.name
        meta["checkpoint_sha256"] = file_sha256(weights)
        meta.update(meta_extra or {})
        _write_whole(out / f"{stem}.meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        resume_path.unlink(missing_ok=True)
    meta.update(meta_extra or {})  # every rank returns the meta rank 0 wrote
    _barrier(world)
    return meta


def _frozen_copy(visual: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(visual).eval().requires_grad_(False)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _diff(a: dict, b: dict) -> str:
    a = a if isinstance(a, dict) else {}
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in b if a.get(k) != b.get(k)) or "?"


def _global_mean(parts: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return parts
    import torch.distributed as dist

    keys = sorted(parts)
    t = torch.tensor([parts[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()

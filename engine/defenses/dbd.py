"""DBD: Directional Bias-guided Defense (Liu et al., ICLR 2026, "Adversarial Attacks Already Tell the Answer").

    V      = [x] + 16 RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) + flip views
                 + bit depth 3 (floor, round, ceil) + JPEG (quality 50, 60, 75) + 6 x clip(x + 0.1 n)
                 + median, mean, Gaussian 5 x 5 filters                                 32 views, one forward
    F      = normalize(f(V)),  z_i = s F_i T^T                                          (32, D), (32, C)
    S      = the 16 augmented views of lowest entropy H(softmax(z_i))                  (is_filter)
    r_i    = F_i - F_0  (i in S),   D = mean_i r_i                                       the "defense direction"
    score  = mean_i cos(r_i, D)
    f      = F_0 + c D,   c = 2.5 if score > 0.8 else 1                                 two-stream reconstruction
    logits = s normalize(f) T^T

Checked in the official code (liuls2002/DBD @36110cf): infer_dbd.py (entropy top-16 of the 31 augmented views,
directions of the L2-normalised features from the original's, their mean, the DB score as the mean cosine,
thresh 0.8, alpha 2.5, vec / (||vec|| + 1e-8) normalisation) and dataset/transform_lib.py (the views, their
order and parameters). Every view comes from one image and the features from one forward: 32 forwards, no
backward, one round per image.

How the views are computed here (scc.defenses.augment has each op's details and tests against PIL/scipy):
float tensors instead of 8-bit PIL images (only bit depth and JPEG quantise, as their definitions do; the
official views are all stored as 8 bits and the input is an 8-bit PNG); RandomResizedCrop is torchvision's
sampling rule from the `crop` draws with bilinear resizing (equal to torchvision's on tensors; within one 8-bit
level of PIL's); bit depth keeps numpy's uint8 wrap-around of the official code by default (round/ceil send
levels >= 240 / >= 225 to 0: `depth_overflow="clip"` saturates instead); JPEG is libjpeg's baseline pipeline in
float (mean difference to PIL below 2 levels); the filters are OpenCV's (cv2.GaussianBlur with sigma = 0 uses
its fixed [1, 4, 6, 4, 1] / 16 kernel at size 5). The official base transform (Resize 224 + CenterCrop) runs after
the views and is the identity on images of the model's size, which is what the engine feeds.

Gradients (for adaptive attacks): exact through crops, noise and filters (the median passes it to the median
pixel); bit depth and JPEG round with a straight-through (identity) gradient, i.e. BPDA is built into those
views; the entropy selection and the score threshold are piecewise constant (no gradient through the choice).
All randomness is in the draws: `crop` (B, 16, 10, 4) and `flip` (B, 16) uniforms, `noise` (B, 6, 3, H, W)
normals. `record["perturbation"]` is zero: DBD corrects the feature, not the pixels.

A differentiable surrogate for adaptive attacks (`soft` = t > 0; 0, the default, is the official procedure):
    w_i    = sigmoid((c - H_i) / t),  c = midway between the keep-th and (keep+1)-th lowest entropy (no gradient)
    D      = sum_i w_i r_i / sum_i w_i,   score = sum_i w_i cos(r_i, D) / sum_i w_i
    factor = 1 + (boost - 1) sigmoid((score - thresh) / t)
As t -> 0 this is the hard selection and threshold again; at small t its forward is close to DBD's while the
attacker's gradient also reaches the choice of views and of the factor (scc.eval.suite's `surrogate-pgd` uses
soft 0.2 with boost 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..draws import Draw
from ..errors import SccError
from ..models import ZeroShotClassifier
from . import augment


@dataclass(frozen=True)
class DBDConfig:
    crops: int = 16  # RandomResizedCrop + flip views
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True  # RandomHorizontalFlip(0.5) after each crop
    depth_bits: int = 3  # bit-depth views: floor, round, ceil at this depth
    depth_overflow: str = "wrap"  # numpy's uint8 cast of 256 (official) or "clip"
    jpeg_qualities: tuple[int, ...] = (50, 60, 75)
    noise_views: int = 6
    noise_sigma: float = 0.1
    filter_size: int = 5  # median, mean and Gaussian filters
    keep: int = 16  # lowest-entropy augmented views kept (is_filter)
    select: bool = True  # is_filter: False keeps every augmented view
    threshold: float = 0.8  # DB-score threshold  [thres]
    boost: float = 2.5  # factor on D when the score exceeds it  [alpha]
    soft: float = 0.0  # temperature of the attack surrogate's soft selection and threshold (0: official, hard)

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio", "jpeg_qualities"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.crops < 0 or self.noise_views < 0 or not 1 <= self.depth_bits <= 8:
            raise SccError(f"need crops >= 0, noise_views >= 0 and 1 <= depth_bits <= 8, got crops={self.crops}, "
                           f"noise_views={self.noise_views}, depth_bits={self.depth_bits}")
        if self.depth_overflow not in ("wrap", "clip"):
            raise SccError(f"depth_overflow must be 'wrap' (official) or 'clip', got {self.depth_overflow!r}")
        if self.filter_size % 2 == 0 or self.filter_size < 1:
            raise SccError(f"filter_size must be odd and positive, got {self.filter_size}")
        for q in self.jpeg_qualities:
            augment.quant_table([1] * 64, q)  # checks 1..100
        if self.soft < 0:
            raise SccError(f"soft is a temperature >= 0 (0: the official hard choices), got {self.soft}")
        if self.select and not 1 <= self.keep <= self.augmented_views():
            raise SccError(f"keep must be in 1..{self.augmented_views()} (the augmented views), got {self.keep}")

    def augmented_views(self) -> int:
        return self.crops + 3 + len(self.jpeg_qualities) + self.noise_views + 3


DBD_DRAWS = {
    "crop": Draw("uniform", 0.0, 1.0, lambda cfg, image: (cfg.crops, augment.CROP_TRIES, 4)),
    "flip": Draw("uniform", 0.0, 1.0, lambda cfg, image: (cfg.crops,)),
    "noise": Draw("normal", shape=lambda cfg, image: (cfg.noise_views, *image)),
}


def dbd_views(x: torch.Tensor, cfg: DBDConfig, crop: torch.Tensor, flip: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) -> (B, 1 + augmented, 3, H, W) in the official order: original, crops, bit depth,
    JPEG, noise, median / mean / Gaussian filters."""
    H, W = x.shape[-2:]
    views = [x[:, None]]
    if cfg.crops:
        boxes = augment.crop_boxes(crop, H, W, cfg.crop_scale, cfg.crop_ratio)  # (B, crops, 4)
        flips = flip < 0.5 if cfg.flip else torch.zeros_like(flip, dtype=torch.bool)
        views.append(augment.resized_crops(x, boxes, flips))
    views += [augment.bit_depth(x, cfg.depth_bits, m, cfg.depth_overflow)[:, None] for m in augment.DEPTH_MODES]
    views += [augment.jpeg(x, q)[:, None] for q in cfg.jpeg_qualities]
    if cfg.noise_views:
        views.append(augment.gaussian_noise(x[:, None], noise, cfg.noise_sigma))
    k = cfg.filter_size
    views += [f(x, k)[:, None] for f in (augment.median_filter, augment.mean_filter, augment.gaussian_filter)]
    return torch.cat(views, 1)


def unit(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """v / (||v|| + eps), the official `_normalize`."""
    return v / (v.norm(dim=-1, keepdim=True) + eps)


def directional_feature(feats: torch.Tensor, logits: torch.Tensor, cfg: DBDConfig) -> torch.Tensor:
    """feats (B, V, D) unit view features (view 0 the original), logits (B, V, C) -> the reconstructed (B, D)."""
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[:, 1:]  # (B, V-1)
    aug = feats[:, 1:]
    orig = feats[:, :1]  # (B, 1, D)
    if cfg.soft > 0:  # the attack surrogate (module docstring): soft weights over every augmented view
        return _soft_feature(orig, aug, ent, cfg)
    if cfg.select:
        idx = (-ent).topk(cfg.keep, dim=-1).indices  # the lowest-entropy augmented views
        aug = aug.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))  # (B, keep, D)
    ref_dir = aug - orig
    mean_dir = ref_dir.mean(1, keepdim=True)  # (B, 1, D)
    score = (unit(ref_dir) * unit(mean_dir)).sum(-1).mean(1)  # (B,)
    factor = torch.where(score > cfg.threshold, cfg.boost, 1.0).to(feats.dtype)
    return (orig + factor[:, None, None] * mean_dir)[:, 0]


def _soft_feature(orig: torch.Tensor, aug: torch.Tensor, ent: torch.Tensor, cfg: DBDConfig) -> torch.Tensor:
    """The surrogate's reconstruction: orig (B, 1, D), aug (B, V-1, D), ent (B, V-1) -> (B, D)."""
    t = cfg.soft
    if cfg.select and cfg.keep < ent.shape[1]:
        low = ent.detach().sort(-1).values  # (B, V-1), ascending
        cut = 0.5 * (low[:, cfg.keep - 1] + low[:, cfg.keep])  # (B,)
        w = torch.sigmoid((cut[:, None] - ent) / t)  # (B, V-1): ~1 for the keep lowest-entropy views
    else:
        w = torch.ones_like(ent)
    w = w / w.sum(1, keepdim=True)
    ref_dir = aug - orig  # (B, V-1, D)
    mean_dir = (w[..., None] * ref_dir).sum(1, keepdim=True)  # (B, 1, D)
    score = (w * (unit(ref_dir) * unit(mean_dir)).sum(-1)).sum(1)  # (B,)
    factor = 1 + (cfg.boost - 1) * torch.sigmoid((score - cfg.threshold) / t)
    return (orig + factor[:, None, None].to(orig.dtype) * mean_dir)[:, 0]


def dbd(clf: ZeroShotClassifier, x: torch.Tensor, cfg: DBDConfig, crop: torch.Tensor, flip: torch.Tensor,
        noise: torch.Tensor, trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """Logits (B, C) of the reconstructed feature. `trace` stays empty (no gradient steps)."""
    views = dbd_views(x, cfg, crop, flip, noise)  # (B, V, 3, H, W)
    B, V = views.shape[:2]
    feats = unit(clf.embed(views.reshape(B * V, *x.shape[1:]))).view(B, V, -1)  # one round
    logits = clf.logit_scale * feats @ clf.text.t()  # (B, V, C)
    final = directional_feature(feats, logits, cfg)
    if record is not None:
        record["perturbation"] = torch.zeros_like(x)
    return clf.logit_scale * unit(final) @ clf.text.t()

"""R-TPT: Robust Test-time Prompt Tuning (Sheng et al., CVPR 2025), spec section 2, per image:

    V      = [x] + [AugMix(RRC+flip(x)) for 63 views]                         64 views, built on x's device
    F      = normalize(f(V))                                                 ONE batched image forward (64 rows)
    w      = softmax(mean top-20 of masked F F^T per row / 0.01)             reliability of each view
    ctx    = token embeddings of "a photo of a" (shared by all classes), AdamW state reset
    Z      = s * F normalize(TextEnc([sot] ctx "{classname}." [eot]))^T      text forward (C prompts)
    loss   = mean entropy(softmax(Z_i)) over the int(0.1 * 64) = 6 lowest-entropy views
    ctx   <- AdamW(lr 5e-3, torch defaults).step(loss)                       text backward
    logits = w @ (s * F normalize(TextEnc(... tuned ctx ...))^T)             text forward; weighted sum of logits

Cost per image: 64 image-encoder forwards in one round (the image encoder is frozen, so its features are
computed once and reused by the weights, the tuning loss and the prediction; the official loop makes 257:
the single image, `forward_features`, an unused `model(images)`, the tuning and the tuned forward), and
`steps` text forward+backward passes plus one text forward, each over the C class prompts.

Randomness is all in the draws (`RTPT_DRAWS`), so any backend can replay the same views:
    crop (B, n, 10, 4) U(0,1)   RandomResizedCrop's 10 tries: area, log-ratio, top, left
    flip (B, n) U(0,1)          horizontal flip when < 0.5
    mix (B, n, chains)          Dirichlet(1, ..., 1) chain weights (normalised Exp(1) draws)
    blend (B, n) U(0,1)         m ~ Beta(1, 1): view = m * x_pre + (1 - m) * mix
    depth (B, n, chains)        ops per chain, uniform in 1..max_depth
    ops, levels, signs (B, n, chains, max_depth)   op index in 0..8, level U(0.1, severity), sign +-1
with n = views - 1.

Differences from the official code (data/augmix_ops.py, rtpt.py), all deliberate:
- Views are built from the float tensor on the model's device (no PIL round-trip, no uint8 quantisation of the
  input). RandomResizedCrop + flip is one bilinear resampling of the whole image (grid_sample): it equals
  torchvision's resized_crop + hflip except on the outermost output pixels, where the crop's border pixels blend
  with their true neighbours instead of being edge-clamped; the crop box follows torchvision's sampling rule
  (10 tries, then the centre-crop fallback).
- AugMix uses our own tensor ops reproducing augmix_ops at severity 1 (levels U(0.1, severity), the same nine
  ops, 3 chains of depth 1-3, Dirichlet(1)/Beta(1) mixing). torchvision's AugMix is not used: at severity 1 it
  always picks magnitude bin 0, which makes rotate/shear/translate/posterize/solarize no-ops, and it shares one
  op chain across a batch. Rotate/shear/translate follow PIL's affine convention (pixel centres, bilinear,
  black outside) and match PIL to 1/255 on 8-bit images, as do posterize/solarize/equalize (8-bit levels) and
  autocontrast (on float values; PIL truncates to 8 bits). Translation is up to S/3 pixels (the official
  224/3 at S = 224).
- fp32 everywhere (the official CLIP runs in fp16).
- The text encoder runs on `context_length` = 40 tokens (the official tokenizer length) or the model's context
  if shorter; with a causal mask the eot output does not depend on later positions, so this only changes cost.
- Self-similarity masking is a config field: "threshold" masks Sim >= 1.0 like the official code (in floating
  point a view's self-similarity may round below 1 and stay in its own top-k), "diagonal" masks the diagonal.
  A view whose top-k reaches a masked entry gets weight 0 as in the official code; if every view does
  (e.g. a constant image), the weights are uniform instead of NaN. The threshold rule is discontinuous: a
  last-ulp change of the features (another attention kernel, a compiled or exported graph) flips which
  self-similarities are masked, and at temperature 0.01 that moves the weights a lot, so other backends match
  eager per image only with "diagonal" (with "threshold" they match in distribution).
- `static_views=True` builds the same views without host syncs or data-dependent shapes (every AugMix op on
  every view, then a selection: traceable by make_fx/export, ~8x the augmentation work); the default applies
  each op only to the views that draw it.
- AdamW is written out (torch's update formula, checked against torch.optim.AdamW in the tests) and the
  gradient comes from torch.func.grad, so the whole procedure stays a pure function of its inputs that
  torch.compile (fullgraph) and make_fx can trace.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..draws import Draw, make_draws
from ..errors import SccError
from ..models import ZeroShotClassifier
from .augment import CROP_TRIES, crop_boxes

AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")
@dataclass(frozen=True)
class RTPTConfig:
    views: int = 64  # 1 original + views - 1 augmented  [C: -b 64]
    augmix: bool = True  # AugMix on RRC+flip (fine-grained sets such as DTD); False: RRC+flip only (ImageNet-*)
    severity: int = 1  # AugMix levels ~ U(0.1, severity)
    chains: int = 3  # AugMix width
    max_depth: int = 3  # ops per chain ~ U{1..max_depth}
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop defaults
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True  # RandomHorizontalFlip(0.5)
    ctx_init: str = "a photo of a"  # learnable context (4 tokens), shared by all classes
    class_format: str = "{}."  # class-specific suffix after the context
    context_length: int | None = 40  # text tokens run through the encoder (None: the model's full context)
    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)  # torch AdamW defaults
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    steps: int = 1  # tuning steps (the confident views are selected on the first)
    selection_p: float = 0.1  # fraction of lowest-entropy views in the loss: int(0.1 * 64) = 6
    topk: int = 20  # neighbours in the reliability score
    temperature: float = 0.01  # softmax temperature of the reliability weights
    self_mask: str = "threshold"  # "threshold": Sim >= 1.0 -> -inf (official); "diagonal": the diagonal
    static_views: bool = False  # AugMix without host syncs or data-dependent shapes (for tracing/export)

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio", "betas"):  # frozen: normalise lists to tuples in place
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.views < 2:
            raise SccError(f"R-TPT needs at least 2 views (the original + augmented), got views={self.views}")
        if int(self.views * self.selection_p) < 1:
            raise SccError(f"selection_p={self.selection_p} keeps int({self.views} * {self.selection_p}) = 0 views; "
                           f"raise selection_p or views")
        if not 1 <= self.topk <= self.views - 1:
            raise SccError(f"topk must be in [1, views - 1 = {self.views - 1}], got {self.topk}")
        if self.self_mask not in ("threshold", "diagonal"):
            raise SccError(f"self_mask must be 'threshold' (official Sim >= 1.0) or 'diagonal', got {self.self_mask!r}")
        if self.steps < 0 or self.chains < 1 or self.max_depth < 1 or self.severity < 1:
            raise SccError(f"need steps >= 0, chains >= 1, max_depth >= 1, severity >= 1; got steps={self.steps}, "
                           f"chains={self.chains}, max_depth={self.max_depth}, severity={self.severity}")
        if self.temperature <= 0 or self.lr < 0:
            raise SccError(f"need temperature > 0 and lr >= 0, got temperature={self.temperature}, lr={self.lr}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise SccError(f"bad crop_scale {self.crop_scale} or crop_ratio {self.crop_ratio}: need 0 < lo <= hi "
                           f"(scale hi <= 1)")
        if "{}" not in self.class_format:
            raise SccError(f"class_format needs a '{{}}' for the class name, got {self.class_format!r}")


# ----------------------------------------------------------------------------------------------------------
# Draws and views
# ----------------------------------------------------------------------------------------------------------
_views_chains = lambda cfg: (cfg.views - 1, cfg.chains)  # per image: n = views - 1 augmented views
_ops_shape = lambda cfg, image: (cfg.views - 1, cfg.chains, cfg.max_depth)

# Declaration order is draw order (a seed reproduces the views). Shapes per image; see the module docstring.
RTPT_DRAWS = {
    "mix": Draw("dirichlet", shape=lambda cfg, image: _views_chains(cfg)),
    "crop": Draw("uniform", 0.0, 1.0, lambda cfg, image: (cfg.views - 1, CROP_TRIES, 4)),
    "flip": Draw("uniform", 0.0, 1.0, lambda cfg, image: (cfg.views - 1,)),
    "blend": Draw("uniform", 0.0, 1.0, lambda cfg, image: (cfg.views - 1,)),
    "depth": Draw("integers", 1, lambda cfg: cfg.max_depth + 1, lambda cfg, image: _views_chains(cfg)),
    "ops": Draw("integers", 0, len(AUGMIX_OPS), _ops_shape),
    "levels": Draw("uniform", 0.1, lambda cfg: cfg.severity, _ops_shape),
    "signs": Draw("sign", shape=_ops_shape),
}


def rtpt_draws(x: torch.Tensor, cfg: RTPTConfig, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The draws of `RTPT_DRAWS` for a batch x (B, 3, H, W) (also `scc.defend(clf, "rtpt").draws(x)`)."""
    return make_draws(RTPT_DRAWS, cfg, x, generator)


def resample(img: torch.Tensor, theta: torch.Tensor, fill_outside: bool = True) -> torch.Tensor:
    """Bilinear resampling in PIL's affine convention: output pixel centre (x, y) (= index + 0.5) reads the input
    at theta @ (x, y, 1), in the same pixel-centre units. img (N, C, H, W), theta (N, 2, 3).

    Like PIL, a read outside the image gives black (fill_outside) and a read inside it interpolates between
    edge-clamped neighbours; fill_outside=False clamps everything to the edge (a crop of the image).
    """
    N, _, H, W = img.shape
    ys = torch.arange(H, device=img.device, dtype=img.dtype) + 0.5
    xs = torch.arange(W, device=img.device, dtype=img.dtype) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)]).reshape(3, -1)  # (3, H*W)
    src = (theta.to(img.dtype) @ pts).transpose(1, 2).reshape(N, H, W, 2)  # (x, y) per output pixel
    size = torch.tensor([W, H], device=img.device, dtype=img.dtype)
    out = F.grid_sample(img, src * (2 / size) - 1, mode="bilinear", padding_mode="border", align_corners=False)
    if fill_outside:
        inside = ((src >= 0) & (src < size)).all(-1)  # (N, H, W)
        out = out * inside[:, None].to(out.dtype)
    return out


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip as one resampling of x (3, H, W) -> (n, 3, size, size).

    boxes (n, 4) = (top, left, h, w); flips (n,) bool: a flipped view reads column x at the mirrored size - x.
    """
    top, left, h, w = boxes.to(x.dtype).unbind(-1)
    sign = 1 - 2 * flips.to(x.dtype)  # -1 when flipped
    zero = torch.zeros_like(top)
    theta = torch.stack([torch.stack([sign * w / size, zero, left + w * flips.to(x.dtype)], -1),
                         torch.stack([zero, h / size, top], -1)], -2)  # (n, 2, 3)
    return resample(x.expand(len(boxes), -1, -1, -1), theta, fill_outside=False)


def _levels8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round()


def geometric_theta(op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, size: int) -> torch.Tensor:
    """theta (n, 2, 3) of augmix_ops' rotate/shear/translate (PIL AFFINE data) for op indices into AUGMIX_OPS;
    rows whose op is not geometric get the identity. Levels in [0.1, severity], signs +-1."""
    dtype = level.dtype
    is_op = lambda name: (op == AUGMIX_OPS.index(name)).to(dtype)
    rot, shx, shy, tx, ty = (is_op(n) for n in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"))
    rad = -torch.deg2rad(sign * torch.floor(level * 3.0)) * rot  # int(level * 30 / 10) degrees, counter-clockwise
    cos, sin, c = torch.cos(rad), torch.sin(rad), size / 2  # (identity when rot = 0)
    shear = sign * level * 0.03  # float(level) * 0.3 / 10
    shift = sign * torch.floor(level * (size / 3) / 10)  # int(level * (S / 3) / 10) pixels
    row0 = torch.stack([cos, sin + shear * shx, (c - cos * c - sin * c) + shift * tx], -1)
    row1 = torch.stack([-sin + shear * shy, cos, (c + sin * c - cos * c) + shift * ty], -1)
    return torch.stack([row0, row1], -2)


def intensity_op(name: str, img: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """One of augmix_ops' pixel-value ops on img (n, 3, S, S) in [0,1] with per-image levels (n,)."""
    if name == "autocontrast":
        lo = img.amin(dim=(-2, -1), keepdim=True)
        hi = img.amax(dim=(-2, -1), keepdim=True)
        return torch.where(hi > lo, (img - lo) / (hi - lo).clamp_min(1e-12), img)
    if name == "equalize":
        return TF.equalize(img)
    if name == "posterize":  # bits = 4 - int(level * 4 / 10): 4 bits for levels < 2.5
        keep = torch.pow(2.0, 4 + torch.floor(level * 0.4)).view(-1, 1, 1, 1)  # 2 ** (8 - bits)
        return torch.floor(_levels8(img) / keep) * keep / 255
    if name == "solarize":  # invert 8-bit levels >= 256 - int(level * 256 / 10)
        threshold = (256 - torch.floor(level * 25.6)).view(-1, 1, 1, 1)
        return torch.where(_levels8(img) >= threshold, 1 - img, img)
    raise SccError(f"unknown AugMix op {name!r}; known: {AUGMIX_OPS}")


INTENSITY = ("autocontrast", "equalize", "posterize", "solarize")


GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def augmix(pre: torch.Tensor, mix: torch.Tensor, blend: torch.Tensor, depth: torch.Tensor, ops: torch.Tensor,
           levels: torch.Tensor, signs: torch.Tensor, static: bool = False) -> torch.Tensor:
    """AugMix of pre (n, 3, S, S): chains of 1-3 ops, mixed by `mix`, blended with pre by `blend`.

    Every (view, chain) pair is one image of a batch. static=False: at each depth each op runs on the images
    that use it (one host read of the op codes per depth). static=True: every op runs on the whole batch and
    each image keeps its own op's result (static shapes, no host sync: traceable, but ~8x the work). Both give
    the same views.
    """
    n, chains, max_depth = ops.shape
    size = pre.shape[-1]
    y = pre.repeat_interleave(chains, dim=0)  # row v * chains + c
    depth, ops = depth.reshape(-1), ops.reshape(-1, max_depth)
    levels, signs = levels.reshape(-1, max_depth).to(pre.dtype), signs.reshape(-1, max_depth).to(pre.dtype)
    rows = lambda mask: mask.view(-1, 1, 1, 1)
    for d in range(max_depth):
        op, level, sign = ops[:, d], levels[:, d], signs[:, d]
        if static:
            out = resample(y, geometric_theta(op, level, sign, size))
            for name in INTENSITY:
                out = torch.where(rows(op == AUGMIX_OPS.index(name)), intensity_op(name, y, level), out)
            y = torch.where(rows(depth > d), out, y)
            continue
        codes = torch.where(depth > d, op, -1).tolist()  # -1: the chain has ended
        groups = [[i for i, c in enumerate(codes) if c >= 0 and AUGMIX_OPS[c] in GEOMETRIC]]
        groups += [[i for i, c in enumerate(codes) if c == AUGMIX_OPS.index(name)] for name in INTENSITY]
        for name, members in zip(("geometric",) + INTENSITY, groups):
            if not members:
                continue
            idx = torch.tensor(members, device=pre.device)
            if name == "geometric":
                y[idx] = resample(y[idx], geometric_theta(op[idx], level[idx], sign[idx], size))
            else:
                y[idx] = intensity_op(name, y[idx], level[idx])
    mixed = (mix.to(pre.dtype).view(n, chains, 1, 1, 1) * y.view(n, chains, *pre.shape[1:])).sum(1)
    m = blend.to(pre.dtype).view(n, 1, 1, 1)
    return m * pre + (1 - m) * mixed


def make_views(x: torch.Tensor, cfg: RTPTConfig, crop, flip, mix, blend, depth, ops, levels, signs) -> torch.Tensor:
    """One image x (3, S, S) -> (views, 3, S, S): the original, then the augmented views."""
    boxes = crop_boxes(crop, x.shape[-2], x.shape[-1], cfg.crop_scale, cfg.crop_ratio)
    flips = (flip < 0.5) if cfg.flip else torch.zeros_like(flip, dtype=torch.bool)
    pre = crop_flip(x, boxes, flips, x.shape[-1])
    if cfg.augmix:
        pre = augmix(pre, mix, blend, depth, ops, levels, signs, static=cfg.static_views)
    return torch.cat([x[None], pre.clamp(0, 1)])


# ----------------------------------------------------------------------------------------------------------
# Prompt learner over the classifier's open_clip text tower
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PromptParts:
    prefix: torch.Tensor  # (C, 1, W): <sot> embedding
    ctx: torch.Tensor  # (n_ctx, W): initial context
    suffix: torch.Tensor  # (C, L - 1 - n_ctx, W): class name, ".", <eot>, padding
    eot: torch.Tensor  # (C,) position pooled by the text tower
    length: int  # L tokens


_PARTS: "weakref.WeakKeyDictionary[ZeroShotClassifier, dict]" = weakref.WeakKeyDictionary()


def text_tower(clip) -> tuple[object, str, int | None]:
    """The open_clip module holding the text transformer, its pooling type and eos id."""
    if clip is None:
        raise SccError("R-TPT tunes the text prompt but this classifier has no open_clip model (clf.clip is None); "
                       "load it with scc.load(...)")
    tower = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    missing = [a for a in needed if not hasattr(tower, a)]
    if tower is None or missing:
        raise SccError(f"R-TPT needs an open_clip CLIP-style text tower ({', '.join(needed)}); "
                       f"{type(clip).__name__} lacks {missing or 'a text tower'}")
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    if pool not in ("argmax", "eos") or getattr(tower, "cls_emb", None) is not None or tower.attn_mask is None:
        raise SccError(f"R-TPT's prompt learner needs a causal text tower pooled at the eot token; "
                       f"{type(clip).__name__} pools with {pool!r}")
    return tower, pool, eos


def _eot_positions(tokens: torch.Tensor, pool: str, eos: int | None) -> torch.Tensor:
    return tokens.argmax(-1) if pool == "argmax" else (tokens == eos).int().argmax(-1)


def prompt_parts(clf: ZeroShotClassifier, cfg: RTPTConfig) -> PromptParts:
    """Token embeddings of '{ctx_init} {class_format}' split into <sot> | context | rest (cached per classifier).

    They are constants of the procedure: when a tracer (make_fx, as the ONNX export uses) calls R-TPT before any
    eager call, they are computed outside the trace and enter it as constant tensors.
    """
    key = (cfg.ctx_init, cfg.class_format, cfg.context_length, tuple(clf.labels), clf.text.device)
    cache = _PARTS.setdefault(clf, {})
    if key not in cache:
        if torch.compiler.is_compiling():
            raise SccError("R-TPT's prompt embeddings (tokenizer, Python) are built on the first eager call: run "
                           "scc.defenses.rtpt.prompt_parts(clf, cfg) or the defense once before torch.compile")
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with disable_proxy_modes_tracing():
            cache[key] = _build_prompt_parts(clf, cfg)
    return cache[key]


def _build_prompt_parts(clf: ZeroShotClassifier, cfg: RTPTConfig) -> PromptParts:
    tower, pool, eos = text_tower(clf.clip)
    if clf.tokenizer is None:
        raise SccError("R-TPT needs the classifier's tokenizer (clf.tokenizer is None); load it with scc.load(...)")
    device = tower.token_embedding.weight.device
    init = clf.tokenizer([cfg.ctx_init]).to(device)
    n_ctx = int(_eot_positions(init, pool, eos)[0]) - 1
    if n_ctx < 1:
        raise SccError(f"ctx_init {cfg.ctx_init!r} has no tokens")
    prompts = [f"{cfg.ctx_init} {cfg.class_format.format(label.replace('_', ' '))}" for label in clf.labels]
    tokens = clf.tokenizer(prompts).to(device)
    eot = _eot_positions(tokens, pool, eos)
    full = tokens.shape[1]
    length = full if cfg.context_length is None else min(cfg.context_length, full)
    if int(eot.max()) >= length:
        worst = prompts[int(eot.argmax())]
        raise SccError(f"prompt {worst!r} has {int(eot.max()) + 1} tokens, more than context_length={length}; "
                       f"raise context_length (the model allows {full})")
    if not torch.equal(tokens[:, 1: 1 + n_ctx], init[:, 1: 1 + n_ctx].expand(len(prompts), -1)):
        raise SccError(f"the tokenizer splits {cfg.ctx_init!r} differently inside the class prompts; "
                       f"end ctx_init on a word boundary")
    tokens = tokens[:, :length]
    with torch.no_grad():
        emb = tower.token_embedding(tokens)  # (C, L, W)
        ctx = tower.token_embedding(init[0, 1: 1 + n_ctx])  # (n_ctx, W)
    return PromptParts(emb[:, :1], ctx, emb[:, 1 + n_ctx:], eot, length)


def encode_prompts(clf: ZeroShotClassifier, parts: PromptParts, ctx: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """(C, D) raw text features of [<sot>, ctx, class suffix] for every class: one text-encoder pass."""
    if getattr(clf, "counter", None) is not None:
        clf.counter.text(parts.prefix.shape[0], backward=backward)
    tower, _, _ = text_tower(clf.clip)
    C, L = parts.prefix.shape[0], parts.length
    cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else ctx.dtype
    x = torch.cat([parts.prefix, ctx[None].expand(C, -1, -1), parts.suffix], 1).to(cast)  # (C, L, W)
    x = x + tower.positional_embedding[:L].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:L, :L])
    x = tower.ln_final(x)
    x = x[torch.arange(C, device=x.device), parts.eot]  # pool at <eot>
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj


# ----------------------------------------------------------------------------------------------------------
# Loss, selection, weights, optimiser
# ----------------------------------------------------------------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def confident_views(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Indices of the int(p * V) lowest-entropy rows (official select_confident_samples)."""
    return torch.argsort(entropy(logits))[: int(logits.shape[0] * p)]


def reliability_weights(feats: torch.Tensor, topk: int, temperature: float, self_mask: str) -> torch.Tensor:
    """softmax(mean of the topk largest masked similarities per view / temperature). feats (V, D) L2-normed."""
    sim = feats @ feats.t()
    if self_mask == "threshold":
        sim = sim.masked_fill(sim >= 1.0, float("-inf"))
    else:
        sim = sim.masked_fill(torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device), float("-inf"))
    score = sim.topk(topk, dim=-1).values.mean(-1).clamp_min(-1e4)  # -inf (masked neighbour) -> weight ~0
    return torch.softmax(score / temperature, -1)


def adamw_step(p, g, m, v, t: int, cfg: RTPTConfig):
    """torch.optim.AdamW's update (amsgrad off) for step t >= 1: returns (p, m, v)."""
    b1, b2 = cfg.betas
    p = p * (1 - cfg.lr * cfg.weight_decay)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = v.sqrt() / math.sqrt(1 - b2 ** t) + cfg.adam_eps
    return p - (cfg.lr / (1 - b1 ** t)) * m / denom, m, v


def tune_and_predict(clf: ZeroShotClassifier, parts: PromptParts, feats: torch.Tensor, cfg: RTPTConfig) -> torch.Tensor:
    """feats (V, D) normalised view features of one image -> (C,) reliability-weighted tuned logits."""
    weights = reliability_weights(feats, cfg.topk, cfg.temperature, cfg.self_mask)
    ctx = parts.ctx
    m, v = torch.zeros_like(ctx), torch.zeros_like(ctx)
    selected = None

    def loss(ctx, selected):  # mean entropy of the confident views; they are chosen on the first step and kept
        text = F.normalize(encode_prompts(clf, parts, ctx, backward=True).to(feats.dtype), dim=-1)
        logits = clf.logit_scale * feats @ text.t()  # (V, C)
        if selected is None:
            selected = confident_views(logits.detach(), cfg.selection_p)
        return entropy(logits[selected]).mean(), selected

    for t in range(1, cfg.steps + 1):
        grad, selected = torch.func.grad(loss, has_aux=True)(ctx, selected)
        ctx, m, v = adamw_step(ctx, grad, m, v, t, cfg)
    with torch.no_grad():
        text = F.normalize(encode_prompts(clf, parts, ctx).to(feats.dtype), dim=-1)
        return weights @ (clf.logit_scale * feats @ text.t())


def rtpt(clf: ZeroShotClassifier, x: torch.Tensor, cfg: RTPTConfig, crop, flip, mix, blend, depth, ops, levels,
         signs, trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """(B, 3, S, S) in [0,1] -> (B, C) logits; each image is tuned from the initial prompt (episodic).
    `record` receives a zero pixel perturbation: R-TPT tunes the prompt, never the pixels.

    `trace` is accepted for the Defended interface and stays empty: R-TPT takes no sign-gradient steps.
    """
    parts = prompt_parts(clf, cfg)
    out = []
    for b in range(x.shape[0]):
        with torch.no_grad():
            views = make_views(x[b], cfg, crop[b], flip[b], mix[b], blend[b], depth[b], ops[b], levels[b], signs[b])
            feats = F.normalize(clf.embed(views), dim=-1)  # (V, D): the only image-encoder pass
        out.append(tune_and_predict(clf, parts, feats, cfg))
    if record is not None:
        record["perturbation"] = torch.zeros_like(x)
    return torch.stack(out).to(x.dtype)

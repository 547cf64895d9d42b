"""Precision: the dtype names every command speaks, and the reduced-precision copy of a classifier's image tower.

    DTYPES["bf16"] -> torch.bfloat16;  resolve_dtype("auto", "cpu") -> torch.float32;  dtype_name(torch.float32) -> "fp32"
    check_dtype_on_device(torch.bfloat16, "cpu")   # one warning line where the CPU has no native bf16 matmul
    clf16 = engine_classifier(clf, torch.bfloat16)     # the tower in bf16; pixels, steps, losses and logits fp32

`engine_classifier` builds the classifier every fast path runs (the eager module's `with_dtype`, the compiled
engine, the ONNX export): the image tower re-assembled with the same weights,
  - a ViT patch embedding (a Conv2d with stride == kernel) as reshape + matmul, whose input gradient is a matmul
    rather than a convolution_backward (the slowest op of a compiled graph on CPU);
  - the self-attention as linear + SDPA on contiguous tensors (PackedSelfAttention), in every dtype;
  - in a reduced dtype, the weights converted (the engine's own copy), the patch stem kept fp32 (Fp32Stem),
    optionally the LayerNorms fp32 (Fp32LayerNorm, for the ONNX export), and fp32 pixels in, fp32 embeddings out
    (CastVisual);
  - the hand kernels its defenses call (`classifier.kernels`: {"sign_step": fn, "view_augment": fn}).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import provenance
from .errors import SccError
from .models import ZeroShotClassifier

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtypes(text: str) -> list[torch.dtype]:
    """'fp32,bf16' -> [torch.float32, torch.bfloat16]."""
    names = [d.strip().lower() for d in text.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown or not names:
        raise SccError(f"unknown dtype(s) {unknown or [text]}; choose from {', '.join(DTYPES)} (comma-separated)")
    return [DTYPES[d] for d in names]


# bf16 on a CPU without native bf16 matmuls, measured on an AVX2-only AMD EPYC (ViT-B-32, batch 1, 2 threads)
BF16_SLOWDOWN = "~30x slower than fp32 (measured on AVX2 only, ViT-B-32 TTC: 21.9 s vs 0.70 s per image)"
# set once the bf16 warning was printed: the worker processes a command starts (eval workers, Ray) inherit it and
# stay quiet; set it yourself to silence the warning
BF16_WARNED_ENV = "SCC_BF16_WARNED"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The image-tower precision `--dtype auto` picks, never a slow one: bf16 on a GPU with native bf16 (compute
    capability 8.0+; the official TTC code runs fp16 autocast there; bf16 keeps fp32's range), else fp32. Always fp32
    on CPU: the bundled tiny models are slower in bf16 even with native bf16 matmuls (scc bench --dtype fp32,bf16:
    0.65-0.8x at batch 1), a CPU without them runs bf16 ~30x slower, and fp32 keeps the reproduction numbers exact;
    ViT-B/32 gains ~2x from bf16 on CPUs with AVX-512 BF16 or AMX (opt in with --dtype bf16)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> a torch dtype for `device`."""
    if name == "auto":
        return default_dtype(device)
    dtypes = parse_dtypes(name)
    if len(dtypes) != 1:
        raise SccError(f"one dtype here, got {name!r}; choose auto, {', '.join(DTYPES)}")
    return dtypes[0]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_dtype_on_device(dtype: torch.dtype, device: str | torch.device) -> None:
    """Reduced precision on a CPU without native matmuls for it (scc.provenance.cpu_flags):
      - fp16 without avx512_fp16 / amx_fp16 runs ~100x slower than fp32 (measured here: 0.37 vs 30 GFLOP/s on one
        thread): refused, with the alternative;
      - bf16 without avx512_bf16 / amx_bf16 runs ~30x slower (BF16_SLOWDOWN) but works: one
        warning line on stderr, once per process and the workers it starts (BF16_WARNED_ENV)."""
    if torch.device(device).type != "cpu":
        return
    flags, native_bf16 = provenance.cpu_flags(), provenance.native_bf16()
    if dtype == torch.float16 and not flags & {"avx512_fp16", "amx_fp16"}:
        instead = "bf16 (or fp32)" if native_bf16 else "fp32"
        raise SccError(f"fp16 on this CPU has no native matmul (no avx512_fp16/amx_fp16) and runs ~100x slower "
                       f"than fp32; use --dtype {instead} on CPU, fp16 on a GPU")
    if dtype == torch.bfloat16 and not native_bf16 and not os.environ.get(BF16_WARNED_ENV):
        os.environ[BF16_WARNED_ENV] = "1"
        has = ", ".join(f for f in provenance.CPU_FLAGS if f in flags) or "no avx2"
        print(f"scc: warning: bf16 on this CPU ({provenance.cpu_name()}: {has}; no avx512_bf16/amx_bf16) has no "
              f"native bf16 matmul and runs {BF16_SLOWDOWN}; use --dtype fp32 or auto (dtype=torch.float32 in "
              "Python)", file=sys.stderr, flush=True)


class PatchMatmul(nn.Module):
    """A Conv2d with stride == kernel size, no padding/dilation/groups, as reshape + matmul (same weights)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # shared Parameters (out, C, p, q), (out,) or None
        self.p, self.q = conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h, w = H // self.p, W // self.q
        x = x[:, :, : h * self.p, : w * self.q]  # a strided conv ignores the remainder rows/columns
        t = x.reshape(B, C, h, self.p, w, self.q).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)  # (B, h*w, C*p*q)
        y = t @ self.weight.reshape(self.weight.shape[0], -1).t()  # (B, h*w, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, h*w, out) -> (B, out, h, w)


def is_patch_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.stride == m.kernel_size and m.padding == (0, 0) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros")


class CastVisual(nn.Module):
    """Runs a tower converted to `dtype` on fp32 inputs and returns fp32 embeddings. With `cast_input=False` the
    tower's own fp32 stem (Fp32Stem) takes the fp32 pixels and casts after itself."""

    def __init__(self, visual: nn.Module, dtype: torch.dtype, cast_input: bool = True):
        super().__init__()
        self.visual, self.dtype, self.cast_input = visual, dtype, cast_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x.to(self.dtype) if self.cast_input else x).float()


class Fp32Stem(nn.Module):
    """A ViT's patch embedding kept in fp32 inside a reduced-precision tower, its output cast to `dtype`.

    bf16 has an 8-bit mantissa: a normalised pixel near 2 moves in steps of 2^-7, about half of a 1/255
    perturbation step, so casting the pixels first rounds most of a sign step away. Keeping this one layer
    (~3% of ViT-B/32's FLOPs) in fp32 halved the robust-accuracy loss of bf16 on the digits model (TTC,
    PGD-10 4/255, 450 images: fp32 74.0%, bf16 69.1%, bf16 with an fp32 stem 72.0%)."""

    def __init__(self, stem: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.stem, self.dtype = stem, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.float()).to(self.dtype)


class Fp32LayerNorm(nn.Module):
    """A LayerNorm computed in fp32 (its weights kept fp32) inside a reduced-precision tower, output in `dtype`,
    as autocast does. The ONNX export of a reduced tower uses it: torch's exporter types an fp16 layer norm's
    saved statistics fp16 where ONNX Runtime expects fp32 and refuses the file."""

    def __init__(self, norm: nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias  # fp32 Parameters (shared with the source tower)
        self.shape, self.eps, self.dtype = norm.normalized_shape, norm.eps, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(self.dtype)


class PackedSelfAttention(nn.Module):
    """nn.MultiheadAttention (batch_first, self-attention, no mask) as linear -> SDPA -> linear on contiguous
    (N, L, E) tensors, with the same weights.

    Inside nn.MultiheadAttention a batch_first input is transposed to (L, N, E) before the packed in-projection;
    the input gradient of that projection then goes through a batched matmul that materialises the (3E, E)
    weight once per token (`[50, 2304, 768]` for ViT-B/32), a strided copy that is slow in bf16 on CPU and a large
    share of the backward pass in fp32 too; the engine's copy uses this module in every dtype."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.heads, self.embed = mha.num_heads, mha.embed_dim
        self.in_proj_weight, self.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias  # (3E, E), (3E,)
        self.out_proj = mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        N, L, E = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3E)
        q, k, v = qkv.view(N, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, L, E/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, E/H)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, E)), None


def is_packable_attention(m: nn.Module) -> bool:
    return (isinstance(m, nn.MultiheadAttention) and m.batch_first and m._qkv_same_embed_dim
            and m.in_proj_weight is not None and m.bias_k is None and m.bias_v is None and not m.add_zero_attn
            and m.dropout == 0.0)


def engine_classifier(clf: ZeroShotClassifier, dtype: torch.dtype = torch.float32,
                      kernels: dict | None = None, fp32_norms: bool = False) -> ZeroShotClassifier:
    """The engine's classifier: the image tower re-assembled (patch convs as matmuls, `dtype`), text buffer as
    is, and the hand kernels its defenses call (`kernels`, see scc.defenses.views.embed_views; none = torch ops).
    `fp32_norms`: a reduced tower's LayerNorms run in fp32 (Fp32LayerNorm; the ONNX export needs it).
    A fine-tuned classifier's `tau_reference` (the frozen original TTC's gate reads, scc.defenses.ttc) comes
    along, re-assembled the same way, so every backend and dtype gates on the original."""
    memo = {id(t): t for t in (*clf.visual.parameters(), *clf.visual.buffers())}
    visual = copy.deepcopy(clf.visual, memo)  # copy the module tree, share every tensor
    stems = 0
    for parent in list(visual.modules()):
        for name, child in list(parent.named_children()):
            if is_patch_conv(child):
                setattr(parent, name, PatchMatmul(child))
                stems += 1
    if dtype != torch.float32:  # the converted weights are the engine's own; a single patch stem stays fp32
        stem = next((m for m in visual.modules() if isinstance(m, PatchMatmul)), None) if stems == 1 else None
        keep = {id(t) for t in stem.parameters()} if stem is not None else set()
        norms = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)] if fp32_norms else []
        keep |= {id(t) for m in norms for t in m.parameters()}
        for module in visual.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) not in keep:
                    module._parameters[key] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    module._buffers[key] = buf.to(dtype)
        for parent in list(visual.modules()):
            for name, child in list(parent.named_children()):
                if stem is not None and child is stem:
                    setattr(parent, name, Fp32Stem(stem, dtype))
                elif any(child is m for m in norms):
                    setattr(parent, name, Fp32LayerNorm(child, dtype))
    for parent in list(visual.modules()):  # every dtype: the fp32 engine's views hit the same batched matmul
        for name, child in list(parent.named_children()):
            if is_packable_attention(child):
                setattr(parent, name, PackedSelfAttention(child))
    if dtype != torch.float32:
        visual = CastVisual(visual, dtype, cast_input=stem is None)
    out = ZeroShotClassifier(visual, clf.text, clf.logit_scale, clf.image_size, clf.labels, name=clf.name,
                             mean=tuple(clf.mean.flatten().tolist()), std=tuple(clf.std.flatten().tolist()),
                             preprocess=clf.preprocess)
    out.text = clf.text  # bit-exact (the constructor re-normalises)
    out.kernels = dict(kernels or {})
    # the text tower and tokenizer stay the caller's (fp32, shared): prompt-tuning defenses (R-TPT) use them
    # eagerly; a plain attribute, so the engine's graphs and state_dict do not carry them
    object.__setattr__(out, "clip", clf.clip)
    out.tokenizer, out.templates = clf.tokenizer, list(clf.templates)
    reference = getattr(clf, "tau_reference", None)
    if reference is not None:  # a fine-tuned model's frozen original (TTC's tau gate): the same tower treatment
        out.tau_reference = engine_classifier(reference, dtype, fp32_norms=fp32_norms)
    return out.to(clf.text.device)

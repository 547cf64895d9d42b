"""Image augmentations of the forward-only defenses (DBD, AGC) as tensor ops driven by draws.

Every op maps (N, 3, H, W) in [0, 1] to the same shape with static shapes, no host sync and no Python branch on
values, so torch.compile (fullgraph) and make_fx/ONNX trace them; their randomness comes only from draw tensors.
The official code runs them on 8-bit PIL images with PIL, OpenCV and numpy; here they run on the float tensor.
What each op matches and what its gradient is:

    crop_boxes(u, H, W, scale, ratio)   torchvision's RandomResizedCrop.get_params from uniforms (10 tries, then
                                        the centre-crop fallback), tensor ops only (also used by R-TPT)
    resized_crops(x, boxes, flips)      crop + bilinear resize back to (H, W) + horizontal flip as two matrix
                                        products per view, A_h @ x @ A_w^T: equal to torchvision's resized_crop
                                        on a tensor (bilinear, align_corners=False, edges clamped inside the crop)
                                        and to PIL's bilinear resize of the cropped image when the crop is
                                        upsampled (always, for crops of the image's own size); exact gradient
    bit_depth(x, bits, mode, overflow)  numpy's floor/round/ceil of the 8-bit levels / 2^(8-bits), times
                                        2^(8-bits), cast to uint8: 256 wraps to 0 (overflow="wrap", as the
                                        official `astype(np.uint8)` does) or saturates at 255 ("clip").
                                        Gradient: straight-through (identity through every rounding)
    jpeg(x, quality)                    baseline JPEG as libjpeg writes it at `quality` and reads it back:
                                        JFIF YCbCr, 4:2:0 chroma (2x2 mean), 8x8 DCT, the standard Annex K tables
                                        scaled as libjpeg's jpeg_quality_scaling, rounding, "fancy" (triangle)
                                        chroma upsampling, 8-bit output. Float DCT and colour conversion instead of
                                        libjpeg's integer ones: within a few 8-bit levels of PIL (tested).
                                        Gradient: straight-through at the roundings (the linear part is exact:
                                        colour transform, chroma averaging and upsampling, DCT)
    median_filter(x, k)                 OpenCV medianBlur (edge pixels replicated); gradient: to the median pixel
    mean_filter(x, k)                   OpenCV blur (BORDER_REFLECT_101); exact gradient
    gaussian_filter(x, k)               OpenCV GaussianBlur(k, sigma=0): for k <= 7 OpenCV uses its fixed
                                        binomial table ([1, 4, 6, 4, 1] / 16 for k = 5), else sigma =
                                        0.3 ((k - 1) / 2 - 1) + 0.8; BORDER_REFLECT_101; exact gradient
    perspectives(x, u, distortion)      torchvision RandomPerspective (PIL path): corner offsets from uniforms,
                                        the homography mapping the distorted corners back to the image corners
                                        (closed form: Heckbert's square-to-quad map and its adjugate, no linear
                                        solve), PIL's transform conventions and PIL's bicubic kernel (tested
                                        against PIL), black outside; gradient through the bicubic weights

The official pipelines also store every view as 8 bits (PIL) and the inputs as 8-bit PNGs; here the views stay
float except where the op itself quantises (bit depth, JPEG).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import SccError


def straight_through(y: torch.Tensor, fn) -> torch.Tensor:
    """fn(y) in the forward pass, the identity in the backward pass (BPDA's identity approximation)."""
    return y + (fn(y) - y).detach()


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Rounding with ties away from zero (libjpeg's quantiser and colour converter; torch.round rounds ties to
    even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def levels8(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels round(255 x) of an image in [0, 1] (straight-through gradient), as float."""
    return straight_through(x * 255, torch.round)


# ----------------------------------------------------------------------------------------------------------
# RandomResizedCrop + flip
# ----------------------------------------------------------------------------------------------------------
CROP_TRIES = 10


def crop_boxes(u: torch.Tensor, height: int, width: int, scale, ratio) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params from uniforms u (..., 10, 4) -> (..., 4) float (top, left, h, w).

    Every try is computed and the first valid one kept (else the centre crop with the ratio clamped), with
    tensor ops only: no host sync, static shapes (traceable by compile/export).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))  # (..., 10)
    aspect = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int64).argmax(-1, keepdim=True)  # the first valid try (0 when none is)
    pick = lambda t: t.gather(-1, first)[..., 0]
    h, w = pick(h), pick(w)
    top = torch.minimum(torch.floor(pick(u[..., 2]) * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(pick(u[..., 3]) * (width - w + 1)), width - w)
    in_ratio = width / height  # torchvision's fallback
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=u.dtype, device=u.device)
    return torch.where(ok.any(-1, keepdim=True), torch.stack([top, left, h, w], -1), fallback)


def resize_matrix(start: torch.Tensor, length: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """(..., out, size) bilinear resampling matrix (align_corners=False) of the segment [start, start + length)
    of an axis of `size` pixels to `out` pixels; reads are clamped to the segment's end pixels."""
    dtype = start.dtype
    i = torch.arange(out, dtype=dtype, device=start.device)
    start, length = start[..., None], length[..., None]  # (..., 1)
    src = start + (i + 0.5) * length / out - 0.5  # (..., out)
    src = torch.minimum(torch.maximum(src, start), start + length - 1)
    i0 = torch.floor(src)
    frac = src - i0
    i1 = torch.minimum(i0 + 1, start + length - 1)
    j = torch.arange(size, dtype=dtype, device=start.device)
    return (1 - frac)[..., None] * (j == i0[..., None]).to(dtype) + frac[..., None] * (j == i1[..., None]).to(dtype)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W), boxes (B, n, 4) = (top, left, h, w), flips (B, n) bool -> (B, n, 3, H, W): each crop
    resized back to (H, W) with bilinear interpolation, then flipped horizontally where `flips`."""
    H, W = x.shape[-2:]
    top, left, h, w = boxes.to(x.dtype).unbind(-1)  # (B, n) each
    rows = resize_matrix(top, h, H, H)  # (B, n, H, H)
    cols = resize_matrix(left, w, W, W)  # (B, n, W, W)
    cols = torch.where(flips[..., None, None], cols.flip(-2), cols)  # a flip reverses the output columns
    return rows[:, :, None] @ x[:, None] @ cols[:, :, None].transpose(-1, -2)  # (B, n, 3, H, W)


# ----------------------------------------------------------------------------------------------------------
# Pixel-value ops
# ----------------------------------------------------------------------------------------------------------
DEPTH_MODES = ("floor", "round", "ceil")


def bit_depth(x: torch.Tensor, bits: int, mode: str, overflow: str = "wrap") -> torch.Tensor:
    """Bit-depth reduction of the 8-bit image: levels -> mode(levels / 2^(8-bits)) * 2^(8-bits) (see the module
    docstring for `overflow`). Straight-through gradient."""
    if mode not in DEPTH_MODES:
        raise SccError(f"bit-depth mode must be one of {DEPTH_MODES}, got {mode!r}")
    interval = 2.0 ** (8 - bits)
    fn = {"floor": torch.floor, "round": torch.round, "ceil": torch.ceil}[mode]
    out = straight_through(levels8(x) / interval, fn) * interval
    out = out - 256 * (out >= 256).to(out.dtype) if overflow == "wrap" else out.clamp(max=255)
    return out / 255


def gaussian_noise(x: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """clip(x + sigma * n, 0, 1), n ~ N(0, 1) a draw of x's shape."""
    return (x + sigma * noise).clamp(0, 1)


# Annex K of the JPEG standard (ITU-T T.81): the example luminance and chrominance quantisation tables
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def quant_table(base: list[int], quality: int) -> list[int]:
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table (force_baseline): the table for `quality`."""
    if not 1 <= quality <= 100:
        raise SccError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((q * scale + 50) // 100, 1), 255) for q in base]


def _dct_matrix(dtype, device) -> torch.Tensor:
    """(8, 8) orthonormal DCT-II: D @ block @ D^T is the JPEG standard's 2-D DCT of an 8x8 block."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(dtype=dtype, device=device)


def _fancy_upsample_matrix(n: int, dtype, device) -> torch.Tensor:
    """(2n, n): libjpeg's "fancy" (triangle) 2x upsampling along one axis, edges replicated:
    out[2i] = 3/4 c[i] + 1/4 c[i-1], out[2i+1] = 3/4 c[i] + 1/4 c[i+1]."""
    r = torch.arange(2 * n, device=device)
    i = r // 2
    near = torch.where(r % 2 == 0, (i - 1).clamp(min=0), (i + 1).clamp(max=n - 1))
    j = torch.arange(n, device=device)
    return 0.75 * (j == i[:, None]).to(dtype) + 0.25 * (j == near[:, None]).to(dtype)


def _blocks_dct(plane: torch.Tensor, table: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Quantise and dequantise one level-shifted plane (N, h, w) block by block: D^T round(D b D^T / Q) Q D."""
    N, h, w = plane.shape
    b = plane.reshape(N, h // 8, 8, w // 8, 8).transpose(2, 3)  # (N, h/8, w/8, 8, 8)
    coef = d @ b @ d.t()
    coef = straight_through(coef / table, round_half_away) * table
    return (d.t() @ coef @ d).transpose(2, 3).reshape(N, h, w)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """x (N, 3, H, W) in [0, 1] -> the image after a baseline JPEG round trip at `quality` (see the module
    docstring)."""
    N, _, H, W = x.shape
    v = levels8(x)  # the encoder reads 8-bit pixels
    ph, pw = -H % 16, -W % 16  # libjpeg pads to whole MCUs (16 x 16 at 4:2:0) by replicating the edges
    if ph or pw:
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
    r, g, b = v.unbind(1)
    # libjpeg's encoder works on integers: Y rounds half up, Cb/Cr round half down (its ONE_HALF - 1 offset)
    # and 4:2:0 downsampling is (sum of the 2 x 2 + bias) >> 2 with the bias alternating 1, 2 along a row;
    # emulating these roundings moves the result from ~2 to ~0.3 levels of PIL's on chroma (measured).
    y = straight_through(0.299 * r + 0.587 * g + 0.114 * b, lambda t: torch.floor(t + 0.5))
    chroma_round = lambda t: torch.floor(t + (0.5 - 2.0 ** -16))
    cb = straight_through(-0.168735892 * r - 0.331264108 * g + 0.5 * b + 128, chroma_round)
    cr = straight_through(0.5 * r - 0.418687589 * g - 0.081312411 * b + 128, chroma_round)
    bias = torch.tensor([1.0, 2.0], dtype=x.dtype, device=x.device).repeat(v.shape[-1] // 4)  # (W / 2,)
    cb, cr = (straight_through(4 * F.avg_pool2d(c[:, None], 2)[:, 0] + bias, lambda t: torch.floor(t / 4) * 4) / 4
              for c in (cb, cr))
    d = _dct_matrix(x.dtype, x.device)
    luma = torch.tensor(quant_table(_LUMA, quality), dtype=x.dtype, device=x.device).view(8, 8)
    chroma = torch.tensor(quant_table(_CHROMA, quality), dtype=x.dtype, device=x.device).view(8, 8)
    y = _blocks_dct(y - 128, luma, d) + 128
    h2, w2 = cb.shape[-2:]
    up_h, up_w = _fancy_upsample_matrix(h2, x.dtype, x.device), _fancy_upsample_matrix(w2, x.dtype, x.device)
    cb, cr = (up_h @ (_blocks_dct(c - 128, chroma, d)) @ up_w.t() for c in (cb, cr))  # centred at 0
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], 1)
    rgb = straight_through(rgb.clamp(0, 255), round_half_away)  # the decoder writes 8-bit pixels
    return rgb[..., :H, :W] / 255


# ----------------------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------------------
def _windows(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """(N, C, k*k, H, W): every k x k neighbourhood of x (N, C, H, W), padded with `mode`, as k*k slices."""
    H, W = x.shape[-2:]
    p = k // 2
    xp = F.pad(x, (p, p, p, p), mode=mode)
    return torch.stack([xp[..., i: i + H, j: j + W] for i in range(k) for j in range(k)], 2)


def median_filter(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """OpenCV medianBlur(x, k): the median of each k x k window (edges replicated). TopK of the window's
    (k*k + 1) / 2 smallest values keeps it an exportable op."""
    if k % 2 == 0:
        raise SccError(f"median filter size must be odd, got {k}")
    return _windows(x, k, "replicate").topk((k * k + 1) // 2, dim=2, largest=False).values[:, :, -1]


def _separable(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """x filtered by taps (a 1-D kernel) along rows then columns, BORDER_REFLECT_101 (torch's "reflect")."""
    k = len(taps)
    C = x.shape[1]
    t = torch.tensor(taps, dtype=x.dtype, device=x.device)
    xp = F.pad(x, (k // 2,) * 4, mode="reflect")
    xp = F.conv2d(xp, t.view(1, 1, 1, k).expand(C, 1, 1, k), groups=C)
    return F.conv2d(xp, t.view(1, 1, k, 1).expand(C, 1, k, 1), groups=C)


def mean_filter(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """OpenCV blur(x, (k, k)): the mean of each k x k window, BORDER_REFLECT_101."""
    return _separable(x, [1.0 / k] * k)


_CV_SMALL_GAUSSIAN = {1: [1.0], 3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
                      7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]}


def gaussian_taps(k: int) -> list[float]:
    """OpenCV getGaussianKernel(k, sigma <= 0): its fixed table for k <= 7, else sigma from k."""
    if k % 2 == 0:
        raise SccError(f"Gaussian filter size must be odd, got {k}")
    if k in _CV_SMALL_GAUSSIAN:
        return _CV_SMALL_GAUSSIAN[k]
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    taps = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(k)]
    return [t / sum(taps) for t in taps]


def gaussian_filter(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """OpenCV GaussianBlur(x, (k, k), 0), BORDER_REFLECT_101."""
    return _separable(x, gaussian_taps(k))


# ----------------------------------------------------------------------------------------------------------
# RandomPerspective
# ----------------------------------------------------------------------------------------------------------
def perspective_corners(u: torch.Tensor, height: int, width: int, distortion: float) -> torch.Tensor:
    """torchvision RandomPerspective.get_params from uniforms u (..., 8) -> the distorted corners (..., 4, 2)
    as (x, y), in the order top-left, top-right, bottom-right, bottom-left. torch.randint(lo, hi) is
    lo + floor(u * (hi - lo))."""
    dw, dh = int(distortion * (width // 2)), int(distortion * (height // 2))
    pick = lambda v, lo, hi: lo + torch.floor(v * (hi - lo))
    lo_x, hi_x = pick(u[..., [0, 6]], 0, dw + 1), pick(u[..., [2, 4]], width - dw - 1, width)
    lo_y, hi_y = pick(u[..., [1, 3]], 0, dh + 1), pick(u[..., [5, 7]], height - dh - 1, height)
    xs = torch.stack([lo_x[..., 0], hi_x[..., 0], hi_x[..., 1], lo_x[..., 1]], -1)
    ys = torch.stack([lo_y[..., 0], lo_y[..., 1], hi_y[..., 0], hi_y[..., 1]], -1)
    return torch.stack([xs, ys], -1)


def square_to_quad(q: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) projective map of the unit square onto the quad q (..., 4, 2) (corners (0,0), (1,0), (1,1),
    (0,1) -> q[0..3]), in closed form (Heckbert 1989): (x, y, w) = M (u, v, 1)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = (q[..., i, :].unbind(-1) for i in range(4))
    dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    den = dx1 * dy2 - dx2 * dy1
    g = (dx3 * dy2 - dx2 * dy3) / den
    h = (dx1 * dy3 - dx3 * dy1) / den
    row0 = torch.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0], -1)
    row1 = torch.stack([y1 - y0 + g * y1, y3 - y0 + h * y3, y0], -1)
    return torch.stack([row0, row1, torch.stack([g, h, torch.ones_like(g)], -1)], -2)


def adjugate3(m: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) adjugate: the inverse times the determinant (a projective map's inverse up to scale)."""
    a = [[m[..., i, j] for j in range(3)] for i in range(3)]
    cof = lambda i, j: (a[(j + 1) % 3][(i + 1) % 3] * a[(j + 2) % 3][(i + 2) % 3]
                        - a[(j + 1) % 3][(i + 2) % 3] * a[(j + 2) % 3][(i + 1) % 3])
    return torch.stack([torch.stack([cof(i, j) for j in range(3)], -1) for i in range(3)], -2)


def perspective_source(corners: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel reads the input: (..., H, W) x and y in PIL's continuous coordinates, for the
    transform that maps the distorted corners (..., 4, 2) onto the image corners (0, 0), (W-1, 0), (W-1, H-1),
    (0, H-1) (torchvision's startpoints). PIL evaluates the map at output pixel centres (index + 0.5).
    Coordinates are scaled by (W - 1, H - 1) first, so every product stays O(1) in float32."""
    size = torch.tensor([width - 1.0, height - 1.0], dtype=corners.dtype, device=corners.device)
    inverse = adjugate3(square_to_quad(corners / size))  # distorted quad -> unit square, up to scale
    ys = (torch.arange(height, dtype=corners.dtype, device=corners.device) + 0.5) / (height - 1)
    xs = (torch.arange(width, dtype=corners.dtype, device=corners.device) + 0.5) / (width - 1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)]).reshape(3, -1)  # (3, H*W)
    src = inverse @ pts  # (..., 3, H*W)
    shape = (*corners.shape[:-2], height, width)
    sx = (width - 1) * src[..., 0, :] / src[..., 2, :]
    sy = (height - 1) * src[..., 1, :] / src[..., 2, :]
    return sx.reshape(shape), sy.reshape(shape)


def _cubic(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    """The four cubic-convolution weights for taps at -1, 0, 1, 2 around a fractional offset t in [0, 1)."""
    def w(d):  # d = |distance| in [0, 2)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return torch.where(d <= 1, near, far)
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


PIL_TRANSFORM_CUBIC_A = -1.0  # PIL's Geometry.c bicubic filter (transforms) is cubic convolution with a = -1


def sample_bicubic(img: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, a: float = PIL_TRANSFORM_CUBIC_A
                   ) -> torch.Tensor:
    """img (N, C, H, W) read at (sx, sy) (N, Ho, Wo) in pixel-index coordinates (pixel centres at integers) by
    cubic convolution with parameter a, neighbour indices clamped to the image (PIL's edge handling)."""
    N, C, H, W = img.shape
    x0, y0 = torch.floor(sx), torch.floor(sy)
    wx, wy = _cubic(sx - x0, a), _cubic(sy - y0, a)
    flat = img.reshape(N, C, H * W)
    out = torch.zeros((N, C, *sx.shape[1:]), dtype=img.dtype, device=img.device)
    for i in range(4):
        yi = (y0 + (i - 1)).clamp(0, H - 1)
        for j in range(4):
            xj = (x0 + (j - 1)).clamp(0, W - 1)
            idx = (yi * W + xj).to(torch.int64).reshape(N, 1, -1).expand(N, C, -1)
            tap = flat.gather(2, idx).reshape(out.shape)
            out = out + (wy[i] * wx[j])[:, None] * tap
    return out


def perspectives(x: torch.Tensor, u: torch.Tensor, distortion: float) -> torch.Tensor:
    """x (B, 3, H, W), u (B, n, 8) uniforms -> (B, n, 3, H, W): n RandomPerspective(distortion, p=1, bicubic,
    fill 0) views, as PIL computes them: source point (sx, sy) of each output pixel; outside [0, W) x [0, H) the
    fill, else PIL's bicubic at (sx - 0.5, sy - 0.5), clipped to [0, 1]."""
    B, n = u.shape[:2]
    H, W = x.shape[-2:]
    sx, sy = perspective_source(perspective_corners(u, H, W, distortion), H, W)  # (B, n, H, W)
    inside = ((sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)).to(x.dtype)
    img = x[:, None].expand(B, n, *x.shape[1:]).reshape(B * n, *x.shape[1:])
    out = sample_bicubic(img, (sx - 0.5).reshape(B * n, H, W), (sy - 0.5).reshape(B * n, H, W))
    return (out.clamp(0, 1) * inside.reshape(B * n, 1, H, W)).reshape(B, n, *x.shape[1:])

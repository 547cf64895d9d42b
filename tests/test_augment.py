"""The forward-only defenses' augmentations (scc.defenses.augment) against the libraries the official code calls:
torchvision (crops, perspective corners), PIL (resize, JPEG, perspective), numpy (bit depth), scipy (filters)."""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage
from torchvision.transforms import InterpolationMode, RandomPerspective, RandomResizedCrop

from scc.defenses import augment as A


def smooth_image(size: int, seed: int = 0, blur: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.uniform(0, 255, (size, size, 3)), (blur, blur, 0))
    return ((img - img.min()) / (img.max() - img.min()) * 255).round().astype(np.uint8)


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.tensor(img).permute(2, 0, 1)[None].float() / 255


def as_levels(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(np.float64) * 255


def test_crop_boxes_follow_torchvision_sampling():
    """Feeding torchvision's own uniforms through crop_boxes gives torchvision's boxes."""
    torch.manual_seed(0)
    for _ in range(20):
        state = torch.get_rng_state()
        top, left, h, w = RandomResizedCrop.get_params(torch.zeros(3, 40, 56), (0.5, 1.0), (3 / 4, 4 / 3))
        torch.set_rng_state(state)  # replay: area, log-ratio per try, then the randint of top and left
        tries = []
        for _ in range(A.CROP_TRIES):
            area = torch.empty(1).uniform_(0, 1).item()
            ratio = torch.empty(1).uniform_(0, 1).item()
            tries.append([area, ratio, 0.0, 0.0])
        u = torch.tensor(tries)
        box = A.crop_boxes(u, 40, 56, (0.5, 1.0), (3 / 4, 4 / 3))
        assert box[2:].tolist() == [h, w]  # the same try is accepted with the same size


def test_resized_crops_match_torchvision_and_pil():
    img = smooth_image(32)
    x = as_tensor(img)
    boxes = torch.tensor([[[3.0, 5.0, 20.0, 24.0], [0.0, 0.0, 32.0, 32.0], [7.0, 2.0, 25.0, 17.0]]])
    flips = torch.tensor([[True, False, True]])
    out = A.resized_crops(x, boxes, flips)
    for i in range(3):
        t, l, h, w = (int(v) for v in boxes[0, i])
        ref = TF.resized_crop(x[0], t, l, h, w, [32, 32], antialias=False)
        ref = TF.hflip(ref) if flips[0, i] else ref
        torch.testing.assert_close(out[0, i], ref, atol=1e-6, rtol=0)
        pil = Image.fromarray(img).crop((l, t, l + w, t + h)).resize((32, 32), Image.BILINEAR)
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT) if flips[0, i] else pil
        assert np.abs(as_levels(out[0, i]) - np.array(pil)).max() <= 1.0  # PIL stores 8 bits


@pytest.mark.parametrize("mode", A.DEPTH_MODES)
def test_bit_depth_is_numpy_on_uint8_with_its_wrap(mode):
    img = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)  # every level
    fn = {"floor": np.floor, "round": np.round, "ceil": np.ceil}[mode]
    with np.errstate(all="ignore"):
        want = (fn(img.astype(np.float32) / 32) * 32).astype(np.uint8)  # the official line, 256 -> 0
    got = as_levels(A.bit_depth(as_tensor(img), 3, mode)[0])
    np.testing.assert_array_equal(got.round(), want)
    if mode != "floor":
        assert (want[-1] == 0).all()  # level 255 wraps to black
        assert (as_levels(A.bit_depth(as_tensor(img), 3, mode, "clip")[0])[-1] == 255).all()


@pytest.mark.parametrize("quality", [50, 60, 75])
def test_jpeg_close_to_pil(quality):
    """Within ~1 level on average of PIL's libjpeg (its integer DCT rounds a few near-tie coefficients the other
    way), while JPEG itself moves pixels by ~6-27 levels; the quantisation tables are PIL's."""
    for seed, blur in ((0, 2.0), (1, 0.7)):
        img = smooth_image(32, seed, blur)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        pil = Image.open(buf)
        assert A.quant_table(A._LUMA, quality) == list(pil.quantization[0])
        assert A.quant_table(A._CHROMA, quality) == list(pil.quantization[1])
        ref = np.array(pil.convert("RGB")).astype(np.float64)
        err = np.abs(as_levels(A.jpeg(as_tensor(img), quality)[0]) - ref)
        change = np.abs(ref - img).mean()
        assert err.mean() < 2.0 and err.mean() < 0.15 * change, (err.mean(), change)


def test_filters_match_opencv_definitions():
    img = smooth_image(24, blur=0.8)
    x = as_tensor(img)
    med = ndimage.median_filter(img, size=(5, 5, 1), mode="nearest")  # cv2.medianBlur: edges replicated
    np.testing.assert_allclose(as_levels(A.median_filter(x, 5)[0]), med, atol=1e-3)
    mean = ndimage.uniform_filter(img.astype(np.float64), size=(5, 5, 1), mode="mirror")  # BORDER_REFLECT_101
    np.testing.assert_allclose(as_levels(A.mean_filter(x, 5)[0]), mean, atol=1e-3)
    k = np.array([1, 4, 6, 4, 1]) / 16  # cv2.getGaussianKernel(5, 0)
    gauss = ndimage.correlate1d(ndimage.correlate1d(img.astype(np.float64), k, 0, mode="mirror"), k, 1, mode="mirror")
    np.testing.assert_allclose(as_levels(A.gaussian_filter(x, 5)[0]), gauss, atol=1e-3)
    assert A.gaussian_taps(9) == pytest.approx(np.exp(-((np.arange(9) - 4) ** 2) / (2 * 1.7 ** 2))
                                               / np.exp(-((np.arange(9) - 4) ** 2) / (2 * 1.7 ** 2)).sum())


def test_perspective_corners_follow_torchvision():
    torch.manual_seed(1)
    for _ in range(20):
        state = torch.get_rng_state()
        _, end = RandomPerspective.get_params(40, 30, 0.5)
        torch.set_rng_state(state)
        dw, dh = int(0.5 * 20), int(0.5 * 15)
        bounds = [(0, dw + 1), (0, dh + 1), (40 - dw - 1, 40), (0, dh + 1), (40 - dw - 1, 40), (30 - dh - 1, 30),
                  (0, dw + 1), (30 - dh - 1, 30)]
        ints = [torch.randint(lo, hi, (1,)).item() for lo, hi in bounds]
        u = torch.tensor([(v - lo + 0.5) / (hi - lo) for v, (lo, hi) in zip(ints, bounds)])  # u mapping to v
        assert A.perspective_corners(u, 30, 40, 0.5).long().tolist() == end


@pytest.mark.parametrize("size", [32, 96])
def test_perspective_matches_pil(size):
    img = smooth_image(size, blur=size / 20)
    x = as_tensor(img)
    u = torch.rand(1, 6, 8, generator=torch.Generator().manual_seed(1))
    out = A.perspectives(x, u, 0.5)[0]
    corners = A.perspective_corners(u, size, size, 0.5)[0].long().tolist()
    start = [[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]]
    for i in range(6):
        ref = np.array(TF.perspective(Image.fromarray(img), start, corners[i], InterpolationMode.BICUBIC, fill=0))
        err = np.abs(as_levels(out[i]) - ref).max(-1)  # worst channel per pixel
        assert err[err <= 3].mean() < 1.0, err[err <= 3].mean()  # PIL's 8-bit rounding
        assert (err > 3).mean() < 0.01, (err > 3).mean()  # only pixels on the quad's edge (inside/outside ties)


def test_gradients_are_straight_through_where_ops_round():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    for op in (lambda z: A.bit_depth(z, 3, "round"), lambda z: A.jpeg(z, 75)):
        g, = torch.autograd.grad(op(x).sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0  # torch.round alone would give zero
    g, = torch.autograd.grad(A.bit_depth(x, 3, "floor").sum(), x)
    torch.testing.assert_close(g, torch.ones_like(g))  # identity through the rounding

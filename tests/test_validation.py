"""scc.validation: the pixel and draw validators every backend shares."""
import pytest
import torch

from scc.errors import SccError
from scc.validation import validate_draws, validate_pixels


@pytest.mark.parametrize("x, message", [
    ([[0.5]], "pixels: expected a torch.Tensor, got list"),
    (torch.rand(2, 3, 16, 16), r"pixels: expected shape \(B, 3, 32, 32\) in \[0,1\], got \(2, 3, 16, 16\); preprocess"),
    (torch.rand(2, 1, 32, 32), r"got \(2, 1, 32, 32\)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"got dtype uint8; scale uint8 images: x.float\(\) / 255"),
    (torch.rand(1, 3, 32, 32) * 255, r"pixels must lie in \[0,1\], got range \[.*\]; divide 0-255 images by 255"),
])
def test_validate_pixels_names_the_problem(x, message):
    with pytest.raises(SccError, match=message):
        validate_pixels(x, 32)


def test_validate_pixels_names_nan_images_and_checks_dtype_device():
    x = torch.rand(4, 3, 8, 8)
    x[2, 1, 3, 3] = float("inf")
    with pytest.raises(SccError, match=r"images \[2\] contain NaN or Inf"):
        validate_pixels(x)
    assert validate_pixels(x, values=False) is x  # shape-only checks pass it through unchanged
    with pytest.raises(SccError, match="expected dtype float32, got float64"):
        validate_pixels(torch.rand(1, 3, 8, 8, dtype=torch.float64), dtype=torch.float32)
    with pytest.raises(SccError, match="expected a tensor on meta, got one on cpu"):
        validate_pixels(torch.rand(1, 3, 8, 8), device="meta")


def test_validate_draws():
    x = torch.rand(2, 3, 4, 4)
    draws = {"start": torch.zeros(2, 3, 4, 4), "noise": torch.zeros(2, 4, 3, 4, 4)}
    out = validate_draws(draws, ("noise", "start"), 2)
    assert out[0] is draws["noise"] and out[1] is draws["start"]
    with pytest.raises(SccError, match=r"need the keys \['noise', 'start'\], got \['start'\]"):
        validate_draws({"start": x}, ("noise", "start"), 2)
    with pytest.raises(SccError, match=r"draw 'start' must be a tensor with 3 rows, got \(2, 3, 4, 4\)"):
        validate_draws({"start": x}, ("start",), 3)

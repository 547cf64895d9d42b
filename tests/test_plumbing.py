"""scc.plumbing: the validator, the attention policy, chunk/pad and example inputs every backend shares."""
import pytest
import torch
from torch.nn.attention import SDPBackend

import scc
from scc.models import SccError
from scc.plumbing import (attention, example_inputs, pad_rows, padded_chunks, power_of_two_buckets, validate_draws,
                          validate_pixels)


@pytest.mark.parametrize("x, message", [
    ([[0.5]], "pixels: expected a torch.Tensor, got list"),
    (torch.rand(2, 3, 16, 16), r"pixels: expected shape \(B, 3, 32, 32\) in \[0,1\], got \(2, 3, 16, 16\); resize"),
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


def test_padded_chunks_cover_every_row_once():
    x, d = torch.arange(11.0), torch.arange(11.0) * 10
    seen = []
    for lo, n, (xs, ds) in padded_chunks([x, d], 4):
        assert xs.shape[0] == ds.shape[0] == 4  # a fixed-batch graph: every chunk padded to 4
        assert torch.equal(xs[n:], xs[n - 1].expand(4 - n))  # padding repeats the last real row
        seen += xs[:n].tolist()
        assert torch.equal(ds[:n], d[lo: lo + n])
    assert seen == x.tolist()
    sizes = [rows[0].shape[0] for _, _, rows in padded_chunks([x], 8, lambda n: 1 << (n - 1).bit_length())]
    assert sizes == [8, 4]  # 8 real rows, then 3 rows in a bucket of 4
    assert [r.shape[0] for r in pad_rows([torch.zeros(3, 2)], 5)] == [5]
    with pytest.raises(SccError, match="chunk size must be a positive integer, got 0"):
        next(padded_chunks([x], 0))


def test_buckets():
    assert power_of_two_buckets(1) == [1]
    assert power_of_two_buckets(8) == [1, 2, 4, 8]
    assert power_of_two_buckets(6) == [1, 2, 4, 6]
    with pytest.raises(SccError, match="max_batch must be a positive integer, got 0"):
        power_of_two_buckets(0)


def test_attention_policy():
    """math SDPA whenever a double backward or a trace needs it, and for compiled CPU graphs; eager and compiled
    CUDA keep PyTorch's own choice."""
    import torch.nn.attention as att

    def backends_inside(purpose, device):
        with attention(purpose, device):
            return set(att._cur_sdpa_kernel_backends())

    everything = backends_inside("eager", "cpu")
    assert backends_inside("differentiable", "cpu") == {SDPBackend.MATH}
    assert backends_inside("trace", "cpu") == {SDPBackend.MATH}
    assert backends_inside("compile", "cpu") == {SDPBackend.MATH}
    assert backends_inside("compile", "cuda") == everything and len(everything) > 1
    with pytest.raises(ValueError, match="unknown attention purpose"):
        attention("fast")


def test_example_inputs_leave_the_module_generator_alone(tiny):
    d = scc.defend(tiny, "scc", seed=3)
    before = d.draws(torch.rand(2, 3, 32, 32))["start"]
    d.reseed(3)
    x, draws = example_inputs(d, 4)
    assert x.shape == (4, 3, 32, 32) and draws["noise"].shape == (4, 4, 3, 32, 32)
    assert torch.equal(d.draws(torch.rand(2, 3, 32, 32))["start"], before)
    x2, draws2 = example_inputs(d, 4)
    assert torch.equal(x, x2) and torch.equal(draws["start"], draws2["start"])  # reproducible

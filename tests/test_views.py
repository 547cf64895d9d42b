"""scc.defenses.views and scc.perturbation: zoom/flip matrices against torch's own bilinear resize, and the projected sign step."""
import pytest
import torch
import torch.nn.functional as F

from scc.defenses.views import View, apply_views, parse_views, zoom_matrix
from scc.perturbation import project, sign_step


@pytest.mark.parametrize("size, zoom", [(32, 0.85), (33, 0.5), (224, 0.9), (7, 1.0)])
def test_zoom_matrix_is_a_bilinear_centre_crop_resize(size, zoom):
    gen = torch.Generator().manual_seed(size)
    img = torch.rand(2, 3, size, size, generator=gen, dtype=torch.float64)
    crop = max(1, round(size * zoom))
    top = (size - crop) // 2
    want = F.interpolate(img[..., top: top + crop, top: top + crop], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=False)
    m = zoom_matrix(size, zoom, dtype=torch.float64)
    torch.testing.assert_close(m @ img @ m.t(), want, atol=1e-12, rtol=0)
    flipped = zoom_matrix(size, zoom, flip=True, dtype=torch.float64)
    torch.testing.assert_close(m @ img @ flipped.t(), want.flip(-1), atol=1e-12, rtol=0)
    if zoom == 1.0:
        torch.testing.assert_close(m, torch.eye(size, dtype=torch.float64))


def test_apply_views_order_and_noise():
    z = torch.rand(2, 3, 8, 8)
    noise = torch.randn(2, 4, 3, 8, 8)
    views = parse_views("id,flip,noise,zoom0.5+noise")
    out = apply_views(z, views, noise, 0.1).view(2, 4, 3, 8, 8)  # (B*L, ...) -> (B, L, ...), batch-major
    torch.testing.assert_close(out[:, 0], z)
    torch.testing.assert_close(out[:, 1], z.flip(-1))
    torch.testing.assert_close(out[:, 2], (z + 0.1 * noise[:, 2]).clamp(0, 1))
    assert views[3] == View(noise=True, zoom=0.5)


def test_sign_step_projects_and_ignores_nan():
    x = torch.tensor([[[[0.0, 0.5, 1.0, 0.5]]]]).expand(1, 3, 1, 4).contiguous()
    delta = torch.full_like(x, 3 / 255)
    g = torch.tensor([[[[-1.0, 1.0, 1.0, float("nan")]]]]).expand(1, 3, 1, 4)
    out = sign_step(delta, g, x, 2 / 255, 4 / 255)
    want = project(torch.tensor([1 / 255, 5 / 255, 5 / 255, 3 / 255]).view(1, 1, 1, 4).expand(1, 3, 1, 4), x, 4 / 255)
    torch.testing.assert_close(out, want)  # clamped to eps, to the [0,1] box; the NaN entry takes no step
    assert out[..., 2].abs().max() == 0  # x = 1: no room to move up

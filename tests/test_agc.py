"""AGC: the consensus-scaled geodesic correction against a per-image re-implementation of utils/pull_modes.py."""
import math

import numpy as np
import pytest
import torch

import scc
from scc.defenses.agc import AGCConfig, correction_beta, geodesic_push
from scc.passes import count_passes


def official_feature(base: np.ndarray, aug: np.ndarray, beta_clean=0.45, beta_adv=2.25, eps=1e-8):
    """build_tangent_filtered_feature for one image (base (D,), aug (N, D), both unit)."""
    cos = aug @ base
    attack = np.clip((1 - cos).mean(), 0, 1)
    sim = aug @ aug.T
    pair = sim[~np.eye(len(aug), dtype=bool)].mean()
    trust = np.clip((pair + 1) * 0.5, 0, 1)
    beta = beta_clean + (beta_adv - beta_clean) * np.clip(attack ** 0.9 * trust ** 1.0, 0, 1)
    anchor = aug.mean(0)
    anchor /= np.linalg.norm(anchor)
    c = np.clip(base @ anchor, -1 + eps, 1 - eps)
    theta = math.acos(c)
    if theta < 1e-6:
        return base, beta
    u = anchor - (base @ anchor) * base
    u /= max(np.linalg.norm(u), eps)
    push = math.cos(beta * theta) * base + math.sin(beta * theta) * u
    return push / np.linalg.norm(push), beta


def test_correction_matches_official_per_image():
    gen = torch.Generator().manual_seed(0)
    B, N, D = 5, 32, 12
    base = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=-1)
    spread = torch.tensor([0.1, 0.5, 1.0, 3.0, 0.0]).view(B, 1, 1)
    aug = torch.nn.functional.normalize(base[:, None] + spread * torch.randn(B, N, D, generator=gen), dim=-1)
    aug[4] = base[4]  # every view equal to the base: theta = 0, the base is returned
    cfg = AGCConfig()
    beta = correction_beta(base, aug, cfg)
    anchor = torch.nn.functional.normalize(aug.mean(1), dim=-1)
    got = geodesic_push(base, anchor, beta, cfg.eps)
    betas = []
    for b in range(B):
        want, want_beta = official_feature(base[b].double().numpy(), aug[b].double().numpy())
        np.testing.assert_allclose(got[b].numpy(), want, atol=2e-5)
        assert beta[b].item() == pytest.approx(want_beta, abs=1e-5)
        betas.append(want_beta)
    assert max(betas) > 1.0 > min(betas)  # overshooting (beta > 1) and short steps both exercised
    torch.testing.assert_close(got[4], base[4])


def test_one_round_of_33_forwards(tiny, digits):
    x = digits[0][:4]
    defended = scc.defend(tiny, "agc", seed=0)
    assert defended.config == AGCConfig(views=32, distortion=0.5, beta_clean=0.45, beta_adv=2.25)
    with count_passes(tiny, len(x)) as c:
        with torch.no_grad():
            out = defended(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert (c.summary()["image_forwards"], c.summary()["image_backwards"], c.image_rounds) == (33, 0, 1)
    with pytest.raises(scc.SccError, match="at least 2 views"):
        AGCConfig(views=1)

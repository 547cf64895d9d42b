"""DBD: the views in the official order and the direction/score stage against a per-image re-implementation of
infer_dbd.py."""
import numpy as np
import pytest
import torch

import scc
from scc.defenses import augment
from scc.defenses.dbd import DBDConfig, dbd_views, directional_feature
from scc.passes import count_passes


def official_stage(feats: np.ndarray, logits: np.ndarray, thres=0.8, alpha=2.5, k=16):
    """infer_dbd.infer for one image: feats (32, D) normalised, logits (32, C) -> the final feature (D,)."""
    norm = lambda v: v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)
    idx = np.argsort(ent[1:], kind="stable")[:k]  # topk(-ent[1:], k)
    ref_dir = feats[idx + 1] - feats[0][None]
    avg = ref_dir.mean(0, keepdims=True)
    score = (norm(ref_dir) @ norm(avg).T).mean()
    return avg[0] * (alpha if score > thres else 1.0) + feats[0]


def test_direction_stage_matches_official_per_image():
    gen = torch.Generator().manual_seed(0)
    cfg = DBDConfig()
    B, V, D, C = 6, 32, 16, 5
    base = torch.randn(B, 1, D, generator=gen)
    feats = base + torch.randn(B, V, D, generator=gen) * torch.tensor([0.2, 0.2, 0.2, 3.0, 3.0, 3.0]).view(B, 1, 1)
    shift = torch.randn(B, 1, D, generator=gen)
    feats[:3, 1:] += shift[:3]  # images 0-2: a shared direction (high DB score), 3-5: dispersed
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = 10 * feats @ torch.randn(D, C, generator=gen)
    got = directional_feature(feats, logits, cfg)
    boosted = 0
    for b in range(B):
        want = official_stage(feats[b].double().numpy(), logits[b].double().numpy())
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-5)
        ref_dir = feats[b, 1:] - feats[b, :1]
        boosted += bool(np.linalg.norm(got[b].numpy() - feats[b, 0].numpy()) > 1.5 * ref_dir.mean(0).norm().item())
    assert boosted == 3  # both branches of the score threshold are exercised


def test_views_in_official_order(tiny, digits):
    x = digits[0][:3]
    cfg = scc.defend(tiny, "dbd").config
    assert cfg.flip is False  # the digits model's override (digits are not flip-invariant)
    cfg = DBDConfig()
    draws = scc.defend(tiny, "dbd", seed=0).record.draws(x, cfg, torch.Generator().manual_seed(0))
    views = dbd_views(x, cfg, **draws)
    assert views.shape == (3, 32, 3, 32, 32) and cfg.augmented_views() == 31
    assert torch.equal(views[:, 0], x)
    boxes = augment.crop_boxes(draws["crop"], 32, 32, cfg.crop_scale, cfg.crop_ratio)
    torch.testing.assert_close(views[:, 1:17], augment.resized_crops(x, boxes, draws["flip"] < 0.5))
    for i, mode in enumerate(augment.DEPTH_MODES):
        torch.testing.assert_close(views[:, 17 + i], augment.bit_depth(x, 3, mode))
    for i, q in enumerate((50, 60, 75)):
        torch.testing.assert_close(views[:, 20 + i], augment.jpeg(x, q))
    torch.testing.assert_close(views[:, 23:29], (x[:, None] + 0.1 * draws["noise"]).clamp(0, 1))
    for i, f in enumerate((augment.median_filter, augment.mean_filter, augment.gaussian_filter)):
        torch.testing.assert_close(views[:, 29 + i], f(x, 5))


def test_one_round_of_32_forwards_and_robustness(tiny, digits):
    x, y = digits[0][:40], digits[1][:40]
    defended = scc.defend(tiny, "dbd", seed=0)
    with count_passes(tiny, len(x)) as c:
        with torch.no_grad():
            clean = defended(x, keys=range(40))
    assert (c.summary()["image_forwards"], c.summary()["image_backwards"], c.image_rounds) == (32, 0, 1)
    assert (clean.argmax(1) == y).float().mean() >= 0.9
    with pytest.raises(scc.SccError, match="keep must be"):
        DBDConfig(keep=40)
    with pytest.raises(scc.SccError, match="depth_overflow"):
        DBDConfig(depth_overflow="saturate")


def test_soft_surrogate_tends_to_the_hard_choices_and_passes_their_gradient():
    """DBDConfig(soft=t): sigmoid weights over the entropies and the score threshold. At a small t its output is
    DBD's (both threshold branches exercised); at t = 0.2 the gradient reaches the entropies, which the hard
    top-k selection (a gather) does not."""
    gen = torch.Generator().manual_seed(0)
    B, V, D, C = 6, 32, 16, 5
    feats = torch.randn(B, 1, D, generator=gen) + torch.randn(B, V, D, generator=gen) * 0.3
    feats[:3, 1:] += torch.randn(3, 1, D, generator=gen)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    proj = torch.randn(D, C, generator=gen)
    logits = 10 * feats @ proj
    hard = directional_feature(feats, logits, DBDConfig())
    near = directional_feature(feats, logits, DBDConfig(soft=1e-6))
    ent = (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))[:, 1:].sort(-1).values
    clear = ent[:, 16] - ent[:, 15] > 1e-4  # images whose 16th and 17th lowest entropies are not a near tie
    assert clear.sum() >= 4
    torch.testing.assert_close(near[clear], hard[clear], atol=1e-4, rtol=0)
    logits = (10 * feats @ proj).requires_grad_(True)  # the features get no gradient through the logits here
    assert not directional_feature(feats, logits, DBDConfig()).requires_grad  # hard: the choice is a gather
    out = directional_feature(feats, logits, DBDConfig(soft=0.2))
    grad, = torch.autograd.grad(out.sum(), logits)  # soft: the gradient reaches the entropies
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(scc.SccError, match="soft is a temperature"):
        DBDConfig(soft=-1)

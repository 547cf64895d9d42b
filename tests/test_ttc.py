"""TTC against a hand-computed case: a linear encoder f(x) = W x, whose deviation gradient is 2 W^T W d."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import scc
from scc.models import ZeroShotClassifier
from scc.defenses.ttc import TTCConfig, counterattack, ttc


def linear_classifier(W: np.ndarray, T: np.ndarray) -> ZeroShotClassifier:
    visual = nn.Sequential(nn.Flatten(), nn.Linear(W.shape[1], W.shape[0], bias=False))
    visual[1].weight.data = torch.tensor(W, dtype=torch.float64)
    clf = ZeroShotClassifier(visual, torch.tensor(T), logit_scale=100.0, image_size=2, labels=["a", "b"],
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return clf.double()


def hand_ttc(W, T, x, u, eps, alpha, steps, tau_thres, beta):
    """The official procedure written out in numpy for one image (x, u flattened)."""
    proj = lambda d: np.minimum(np.maximum(np.clip(d, -eps, eps), -x), 1 - x)
    e0 = W @ x
    d = proj(eps * u)
    iterates = [d]
    tau = np.linalg.norm(W @ d) / np.linalg.norm(e0)  # ||f(x+d0) - f(x)|| / ||f(x)||
    for _ in range(steps):
        g = 2 * W.T @ (W @ d)  # grad_d ||W(x + d) - W x||^2
        d = proj(d + alpha * np.sign(g))
        iterates.append(d)
    w = np.exp(beta * np.arange(steps + 1))
    w /= w.sum()
    delta = sum(wk * dk for wk, dk in zip(w, iterates)) if tau < tau_thres else iterates[0]
    e = W @ (x + delta)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    return 100 * Tn @ (e / np.linalg.norm(e)), tau, delta


@pytest.mark.parametrize("tau_thres", [0.2, 1e-9])  # counterattack fires / falls back to the random start
def test_ttc_matches_hand_computation(tau_thres):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 12))
    T = rng.normal(size=(2, 3))
    x = rng.uniform(0.3, 0.7, size=12)
    u = rng.uniform(-1, 1, size=12)
    cfg = TTCConfig(eps=4 / 255, alpha=1 / 255, steps=2, tau_thres=tau_thres, beta=2.0)
    want_logits, want_tau, want_delta = hand_ttc(W, T, x, u, cfg.eps, cfg.alpha, cfg.steps, cfg.tau_thres, cfg.beta)
    assert (want_tau < tau_thres) == (tau_thres == 0.2), "the case must exercise the intended branch"
    clf = linear_classifier(W, T)
    xt, ut = torch.tensor(x).view(1, 3, 2, 2), torch.tensor(u).view(1, 3, 2, 2)
    delta, tau = counterattack(clf, xt, cfg, ut)
    np.testing.assert_allclose(tau.numpy(), [want_tau], rtol=1e-10)
    np.testing.assert_allclose(delta.flatten().numpy(), want_delta, atol=1e-12)
    np.testing.assert_allclose(ttc(clf, xt, cfg, ut)[0].numpy(), want_logits, rtol=1e-6)  # text stored in fp32


def test_ttc_gating_is_per_sample(tiny, digits):
    x = digits[0][:6]
    d = scc.defend(tiny, "ttc")
    draws = d.draws(x)
    _, tau = counterattack(tiny, x, d.config, draws["start"])
    cfg = TTCConfig(tau_thres=float(tau.median()))  # half the batch above, half below
    delta, tau2 = counterattack(tiny, x, cfg, draws["start"])
    start = torch.minimum(torch.maximum((cfg.eps * draws["start"]).clamp(-cfg.eps, cfg.eps), -x), 1 - x)
    for i in range(len(x)):
        fell_back = torch.equal(delta[i], start[i])
        assert fell_back == bool(tau2[i] >= cfg.tau_thres), f"image {i}: tau={tau2[i]:.4f} thres={cfg.tau_thres:.4f}"


def test_perturbation_stays_in_ball_and_box(tiny, digits):
    x = digits[0][:8]
    d = scc.defend(tiny, "ttc")
    delta, _ = counterattack(tiny, x, d.config, d.draws(x)["start"])
    assert delta.abs().max() <= 4 / 255 + 1e-7
    assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6  # float rounding of the convex mix


def test_config_errors():
    with pytest.raises(scc.SccError, match="at least one counterattack step"):
        TTCConfig(steps=0)


@pytest.mark.parametrize("tau_thres", [0.2, 0.0147])  # every image counterattacked / about half of them
def test_ttc_equals_the_official_procedure(tiny, digits, tau_thres):
    """scc's TTC (eager fp32) against scc.bench.official, an independent implementation of the official code's
    order of passes (reference forward, K forward+autograd.grad steps, final forward), on the same draws."""
    from scc.bench.official import official_ttc

    x = digits[0][:64]
    d = scc.defend(tiny, "ttc", seed=0, tau_thres=tau_thres)
    draws = d.draws(x)
    _, tau = counterattack(tiny, x, d.config, draws["start"])
    gated = (tau < tau_thres).float().mean().item()
    assert (gated == 1.0) if tau_thres == 0.2 else (0.2 < gated < 0.8), gated
    with torch.no_grad():
        ours, official = d(x, draws), official_ttc(tiny, x, draws["start"], tau_thres=tau_thres)
    assert torch.equal(ours.argmax(1), official.argmax(1))
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)

"""DOC against an independent per-image implementation of the paper's equations (Algorithm 1) on the bundled model."""
import dataclasses

import pytest
import torch

import scc
from scc.defenses.doc import DOCConfig, gate_weight
from scc.passes import count_passes


def reference(clf, x, cfg, start, gate, orth):
    """One image at a time, plain autograd, written from the paper's Algorithm 1."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b: b + 1]
        with torch.no_grad():
            e0 = clf.embed(xb)
            eta = cfg.eps * gate[b] if cfg.gate_noise == "uniform" else cfg.eps * gate[b].sign()
            cos = torch.nn.functional.cosine_similarity(clf.embed(xb + eta), e0, dim=-1)  # (M,)
            w = torch.sigmoid(torch.tensor(cfg.gamma * (cfg.tau - (1 - cos.mean().item()))))
        d0 = torch.clamp(cfg.eps * start[b: b + 1], -cfg.eps, cfg.eps)
        d0 = torch.min(torch.max(d0, -xb), 1 - xb)
        d, m = d0.clone(), torch.zeros_like(xb)
        for t in range(cfg.steps):
            d_ = d.clone().requires_grad_(True)
            g, = torch.autograd.grad(torch.norm(clf.embed(xb + d_) - e0), d_)  # the paper's ||.||, not squared
            g = g / g.norm()
            r = orth[b, t][None]
            r = r - (r * g).sum() * g
            m = cfg.momentum * m + (1 - cfg.momentum) * (g + cfg.orth * r / r.norm())
            d = torch.clamp(d + cfg.alpha * m.sign(), -cfg.eps, cfg.eps)
            d = torch.min(torch.max(d, -xb), 1 - xb)
        delta = w * d + (1 - w) * d0
        out.append((clf.logits_from_embedding(clf.embed(xb + delta)).detach(), delta, w))
    return (torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), torch.stack([o[2] for o in out]))


@pytest.mark.parametrize("gate_noise", ["uniform", "sign"])
def test_matches_per_image_reference(tiny, digits, gate_noise):
    x = digits[0][:5]
    defended = scc.defend(tiny, "doc", seed=0, gate_noise=gate_noise, tau=0.01)  # tau ~ the tiny model's tau_hat:
    cfg = defended.config                                                          # gates between 0 and 1
    draws = defended.draws(x)
    record, trace = {}, []
    logits = defended(x, draws, trace=trace, record=record)
    want_logits, want_delta, want_w = reference(tiny, x, cfg, draws["start"], draws["gate"], draws["orth"])
    w, _ = gate_weight(tiny, x, cfg, draws["gate"])
    assert ((w > 0.05) & (w < 0.95)).any(), w  # the blend is exercised, not only its ends
    torch.testing.assert_close(w, want_w.flatten(), atol=1e-5, rtol=0)
    assert len(trace) == cfg.steps == 4
    torch.testing.assert_close(record["perturbation"], want_delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-3, rtol=0)


def test_orthogonal_direction_and_momentum_matter(tiny, digits):
    """lambda and mu change the steps (a dropped term would leave them equal) and the budget holds."""
    x = digits[0][:6]
    base = scc.defend(tiny, "doc", seed=3)
    draws = base.draws(x)
    deltas = {}
    for key, over in (("paper", {}), ("no-orth", {"orth": 0.0}), ("no-momentum", {"momentum": 0.0})):
        d = scc.defend(tiny, "doc", seed=3, **over)
        deltas[key] = d.perturbation(x, draws)
        assert deltas[key].abs().max() <= 4 / 255 + 1e-7
        assert (x + deltas[key]).min() >= -1e-7 and (x + deltas[key]).max() <= 1 + 1e-7
    assert not torch.equal(deltas["paper"], deltas["no-orth"])
    assert not torch.equal(deltas["paper"], deltas["no-momentum"])


def test_gate_falls_back_to_the_random_start(tiny, digits):
    x = digits[0][:4]
    d = scc.defend(tiny, "doc", seed=0, tau=-1.0)  # tau_hat >= 0 > tau: w = sigmoid(-20 (1 + tau_hat)) ~ 0
    draws = d.draws(x)
    start = torch.min(torch.max((4 / 255 * draws["start"]).clamp(-4 / 255, 4 / 255), -x), 1 - x)
    torch.testing.assert_close(d.perturbation(x, draws), start, atol=1e-8, rtol=0)


def test_passes_and_errors(tiny, digits):
    with count_passes(tiny, 2) as c:
        scc.defend(tiny, "doc")(digits[0][:2])
    assert (c.summary()["image_forwards"], c.summary()["image_backwards"], c.image_rounds) == (11, 4, 6)
    for bad, match in (({"steps": 0}, "steps >= 1"), ({"momentum": 1.0}, "momentum"), ({"gate_noise": "x"}, "gate_noise")):
        with pytest.raises(scc.SccError, match=match):
            dataclasses.replace(DOCConfig(), **bad)

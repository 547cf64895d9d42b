"""Anti-adv against a re-implementation of the official wrapper (Anti_Adv.py) on the bundled model."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import scc
from scc.defenses.anti_adv import AntiAdvConfig, anti_adversary
from scc.passes import count_passes


def official(clf, x, k, alpha):
    """anti_adversary_wrapper.get_anti_adversary + forward, as the official code writes it (no normalisation)."""
    sudo_label = clf.logits_from_embedding(clf.embed(x)).max(1)[1]
    anti_adv = torch.zeros_like(x, requires_grad=True)
    for _ in range(k):
        loss = F.cross_entropy(clf.logits_from_embedding(clf.embed(x + anti_adv)), sudo_label)
        grad = torch.autograd.grad(loss, anti_adv)
        anti_adv.data -= alpha * grad[0].sign()
    return anti_adv.detach(), clf.logits_from_embedding(clf.embed(x + anti_adv)).detach()


def test_paper_preset_matches_official_code(tiny, digits):
    x = digits[0][:8]
    defended = scc.defend(tiny, "anti-adv")
    assert defended.config == AntiAdvConfig(steps=2, alpha=0.15, eps=None, box=False)
    record, trace = {}, []
    logits = defended(x, trace=trace, record=record)
    want_g, want_logits = official(tiny, x, 2, 0.15)
    assert len(trace) == 2
    torch.testing.assert_close(record["perturbation"], want_g, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    assert (x + want_g).min() < 0 or (x + want_g).max() > 1  # the official code leaves the box: so do we


def test_descent_raises_the_pseudo_label(tiny, digits):
    """A sign error (ascent) would lower the predicted class's probability instead."""
    x = digits[0][:16]
    defended = scc.defend(tiny, "anti-adv-ttc-budget")
    with torch.no_grad():
        before = tiny(x).softmax(-1)
        label = before.argmax(-1)
        g = defended.perturbation(x)
        after = tiny(x + g).softmax(-1)
    gain = after.gather(1, label[:, None]) - before.gather(1, label[:, None])
    assert (gain >= -1e-6).all() and gain.mean() > 0, gain.flatten()


def test_ttc_budget_projects_and_aliases(tiny, digits):
    x = digits[0][:8]
    d = scc.defend(tiny, "anti-adv-ttc-budget")
    assert (d.config.alpha, d.config.eps) == (1 / 255, 4 / 255)
    assert d.spec == "anti-adv-ttc-budget"
    g = anti_adversary(tiny, x, dataclasses.replace(d.config, steps=6))  # 6 x 1/255 would leave the 4/255 ball
    assert g.abs().max() <= 4 / 255 + 1e-7 and (x + g).min() >= 0 and (x + g).max() <= 1
    original = scc.defend(tiny, "anti-adv-original")
    assert original.spec == "anti-adv" and original.config == scc.defend(tiny, "anti-adv").config
    boxed = anti_adversary(tiny, x, AntiAdvConfig(box=True))
    assert (x + boxed).min() >= 0 and (x + boxed).max() <= 1


def test_passes_and_config_errors(tiny, digits):
    with count_passes(tiny, 2) as c:
        scc.defend(tiny, "anti-adv")(digits[0][:2])
    assert c.summary()["image_forwards"] == 3 and c.summary()["image_backwards"] == 2 and c.image_rounds == 3
    with pytest.raises(scc.SccError, match="steps >= 1"):
        AntiAdvConfig(steps=0)
    with pytest.raises(scc.SccError, match="eps must be"):
        AntiAdvConfig(eps=2.0)

"""HD (Hedge Defense) against a re-implementation of the official loop (hedge_defense.py) on the bundled model."""
import pytest
import torch
import torch.nn.functional as F

import scc
from scc.defenses.hd import HDConfig
from scc.passes import count_passes


def official(clf, x, u, eps, step_size, steps):
    """HedgeDefense.hedge_defense with the random start given: returns (last example, summed logits)."""
    model = lambda z: clf.logits_from_embedding(clf.embed(z))
    x_hedge = (x + eps * u).requires_grad_(True)  # uniform_(-eps, eps) == eps * U(-1, 1), no clamp
    sum_pred = None
    for k in range(steps):
        logits = model(x_hedge)
        sum_pred = torch.zeros_like(logits) if k == 0 else sum_pred + logits
        C = logits.shape[-1]
        loss = F.kl_div(F.log_softmax(logits, dim=1), torch.ones_like(logits) / C, reduction="batchmean")
        grad, = torch.autograd.grad(loss, x_hedge)
        x_hedge = x_hedge.detach() + step_size * grad.sign()
        eta = torch.clamp(x_hedge - x, -eps, eps)
        x_hedge = torch.clamp(x + eta, 0, 1).requires_grad_(True)
    return sum_pred.detach()


@pytest.mark.parametrize("label, steps", [("hd", 20), ("hd-ttc-budget", 2)])
def test_matches_official_loop(tiny, digits, label, steps):
    x = digits[0][:6]
    defended = scc.defend(tiny, label, seed=0)
    cfg = defended.config
    assert cfg.steps == steps and cfg.eps == (8 / 255 if steps == 20 else 4 / 255)
    draws = defended.draws(x)
    trace = []
    logits = defended(x, draws, trace=trace)
    want = official(tiny, x, draws["start"], cfg.eps, cfg.alpha, cfg.steps)
    assert len(trace) == steps - 1  # the last step's gradient is never used
    torch.testing.assert_close(logits * (steps - 1), want, atol=2e-3, rtol=1e-5)  # we average, they sum
    assert torch.equal(logits.argmax(1), want.argmax(1))


def test_ascent_on_the_kl_and_projection(tiny, digits):
    """The hedge steps raise KL(uniform || p) (a descent bug would lower it) and stay in the eps ball and the box."""
    x = digits[0][:16]
    defended = scc.defend(tiny, "hd", seed=1, steps=6)
    draws = defended.draws(x)
    d = defended.perturbation(x, draws)
    assert d.abs().max() <= 8 / 255 + 1e-7 and (x + d).min() >= 0 and (x + d).max() <= 1
    kl = lambda z: (-torch.log_softmax(tiny(z), -1).mean(-1))
    with torch.no_grad():
        start = (x + 8 / 255 * draws["start"]).clamp(0, 1)
        assert (kl(x + d) - kl(start)).mean() > 0


def test_passes_aliases_and_errors(tiny, digits):
    with count_passes(tiny, 1) as c:
        scc.defend(tiny, "hd-original")(digits[0][:1])
    assert (c.summary()["image_forwards"], c.summary()["image_backwards"], c.image_rounds) == (20, 19, 20)
    assert scc.defend(tiny, "hd-original").spec == "hd"
    with pytest.raises(scc.SccError, match="steps >= 2"):
        HDConfig(steps=1)

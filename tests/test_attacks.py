"""Our PGD/CW (TTC protocol) against torchattacks on the same model, eps and steps."""
import pytest
import torch

from scc.attacks import attack, pgd


@pytest.fixture(scope="module")
def subset(digits):
    return digits[0][:200], digits[1][:200]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_matches_torchattacks(tiny, subset):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = subset
    eps = 4 / 255
    ours = accuracy(tiny, pgd(tiny, x, y, eps=eps, alpha=1 / 255, steps=10, generator=torch.Generator().manual_seed(0)), y)
    torch.manual_seed(0)
    ref_attack = torchattacks.PGD(tiny, eps=eps, alpha=1 / 255, steps=10, random_start=True)
    theirs = accuracy(tiny, ref_attack(x, y), y)
    clean = accuracy(tiny, x, y)
    assert ours < clean - 0.3, "PGD-10 at 4/255 must hurt the tiny model"
    assert abs(ours - theirs) < 0.06, f"ours {ours:.3f} vs torchattacks {theirs:.3f}"


def test_attacks_respect_ball_and_box(tiny, subset):
    x, y = subset
    for name in ("pgd", "cw"):
        adv = attack(tiny, x, y, name, eps=2 / 255, steps=3)
        assert (adv - x).abs().max() <= 2 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_cw_lowers_accuracy(tiny, subset):
    x, y = subset
    assert accuracy(tiny, attack(tiny, x, y, "cw", eps=4 / 255), y) < accuracy(tiny, x, y) - 0.3


def test_torchattacks_can_attack_the_defended_module(tiny, subset):
    """The defended module keeps the [0,1] -> logits contract, so torchattacks runs on it unchanged."""
    torchattacks = pytest.importorskip("torchattacks")
    import scc

    x, y = subset[0][:4], subset[1][:4]
    d = scc.defend(tiny, "scc", preset="latency")
    adv = torchattacks.PGD(d, eps=1 / 255, alpha=1 / 255, steps=1)(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 1 / 255 + 1e-6

"""SCC: ablation switches, presets, determinism, fusion, and measured pass counts (spec section 5)."""
import dataclasses

import pytest
import torch

import scc
from scc.passes import count_passes
from scc.defenses import make_config
from scc.defenses.ttc import ttc


@pytest.fixture(scope="module")
def batch(digits):
    return digits[0][:16], digits[1][:16]


def test_both_switches_off_is_ttc_exactly(tiny, batch):
    x, _ = batch
    d = scc.defend(tiny, "scc", semantic=False, spatial=False)
    draws = d.draws(x)
    ttc_cfg = scc.defend(tiny, "ttc").config
    assert d.config.warmup == ttc_cfg
    assert torch.equal(d(x, draws), ttc(tiny, x, ttc_cfg, draws["start"]))


def test_semantic_off_predicts_views_of_warmup(tiny, batch):
    x, _ = batch
    d = scc.defend(tiny, "scc", semantic=False)
    with count_passes(tiny, len(x)) as c:
        d(x)
    # reference + K_w = 2 step forwards + L = 4 final views; no corrective step
    assert c.summary()["image_forwards"] == 1 + 2 + 4 and c.summary()["image_backwards"] == 2


def test_spatial_off_uses_identity_view_only(tiny, batch):
    """Counted in a real run: Stage 1 keeps its N = 4 views (one no-grad forward of 4 rows), then Stages 2-3 run
    the identity view alone (S = 3 steps of one forward + backward each, one final forward)."""
    x, _ = batch
    d = scc.defend(tiny, "scc", spatial=False)
    with count_passes(tiny, len(x)) as c:
        d(x)
    got = c.summary()
    assert got["image_forwards"] == 1 + 2 + 4 + 3 + 1 and got["image_backwards"] == 2 + 3, got
    rows = [n for kind, n in c.log if kind == "image"]
    assert rows == [16, 16, 16, 64, 16, 16, 16, 16], rows  # warm-up ref + 2 steps, Stage 1 (4 views), 3 steps, final


def test_configs_are_frozen():
    cfg = make_config("scc", "latency")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 5
    assert hash(cfg) == hash(make_config("scc", "latency"))  # usable as a cache key


def test_presets():
    paper = make_config("scc", "paper")
    assert (paper.warmup.steps, paper.steps, len(paper.stage_views())) == (2, 3, 4)
    assert paper.views == ("id", "flip", "noise", "flip+noise") and paper.sigma == 0.01 and paper.sharpen == 0.5
    lat = make_config("scc", "latency")
    assert (lat.warmup.steps, lat.steps, len(lat.stage_views()), lat.fuse) == (1, 1, 4, True)
    digits = make_config("scc", "paper", "scc-tiny-digits")
    assert not any(v.flip for v in digits.stage_views()), "digits are not flip-invariant"
    assert make_config("scc", "latency", "scc-tiny-digits", steps=2).steps == 2
    assert make_config("scc", "paper", warmup__steps=4).warmup.steps == 4


@pytest.mark.parametrize("bad, match", [
    (dict(name="nope"), "unknown defense"),
    (dict(preset="fast"), "unknown preset"),
    (dict(stepz=3), r"no setting\(s\) \['stepz'\]"),
    (dict(views=("id", "twirl")), "unknown view part"),
    (dict(sharpen=2.0), "sharpening temperature"),
])
def test_config_errors(bad, match):
    kwargs = {"name": "scc", "preset": "paper", **bad}
    with pytest.raises(scc.SccError, match=match):
        make_config(kwargs.pop("name"), kwargs.pop("preset"), **kwargs)


def test_determinism_under_seed(tiny, batch):
    x, _ = batch
    a = scc.defend(tiny, "scc", preset="latency", seed=7)(x)
    b = scc.defend(tiny, "scc", preset="latency", seed=7)(x)
    c = scc.defend(tiny, "scc", preset="latency", seed=8)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fusion_is_exact(tiny, batch):
    """Stage 1 fused into the first corrective step computes the same prototype and step signs."""
    x, _ = batch
    d = scc.defend(tiny, "scc")
    draws = d.draws(x)
    t_fused, t_plain = [], []
    fused = d(x, draws, trace=t_fused)
    d.config = dataclasses.replace(d.config, fuse=False)  # configs are frozen: a compiled graph captures them
    plain = d(x, draws, trace=t_plain)
    assert len(t_fused) == len(t_plain) == 2 + 3
    for k, (a, b) in enumerate(zip(t_fused, t_plain)):
        agree = (a == b).float().mean().item()
        assert agree > 0.999, f"step {k}: sign agreement {agree:.5f}"
    assert torch.equal(fused.argmax(1), plain.argmax(1))


@pytest.mark.parametrize("preset, fwd, bwd, rounds", [("paper", 19, 14, 7), ("latency", 10, 5, 4)])
def test_pass_counts_match_spec_table(tiny, batch, preset, fwd, bwd, rounds):
    x, _ = batch
    d = scc.defend(tiny, "scc", preset=preset)
    with count_passes(tiny, len(x)) as c:
        d(x)
    got = c.summary()
    assert (got["image_forwards"], got["image_backwards"], got["image_rounds"]) == (fwd, bwd, rounds), got


def test_ttc_pass_counts(tiny, batch):
    x, _ = batch
    with count_passes(tiny, len(x)) as c:
        scc.defend(tiny, "ttc")(x)
    assert c.summary()["image_forwards"] == 4 and c.summary()["image_backwards"] == 2


def test_scc_keeps_clean_accuracy_and_adds_robustness(tiny, digits):
    """On 150 held-out digits attacked by PGD-10 eps=4/255: SCC well above undefended and TTC."""
    from scc.attacks import pgd

    x, y = digits[0][:150], digits[1][:150]
    adv = pgd(tiny, x, y, eps=4 / 255, alpha=1 / 255, generator=torch.Generator().manual_seed(0))
    acc = lambda m, z, **kw: (m(z, **kw).argmax(1) == y).float().mean().item()
    keys = list(range(len(y)))  # image i has the same draws, clean and attacked
    with torch.no_grad():
        undefended, clean = acc(tiny, adv), acc(tiny, x)
        ttc_rob = acc(scc.defend(tiny, "ttc", seed=0), adv, keys=keys)
        defended = scc.defend(tiny, "scc", seed=0)
        scc_rob, scc_clean = acc(defended, adv, keys=keys), acc(defended, x, keys=keys)
    assert scc_rob > undefended + 0.3, (scc_rob, undefended)
    assert scc_rob >= ttc_rob, (scc_rob, ttc_rob)
    assert scc_clean >= clean - 0.03, (scc_clean, clean)


def test_correct_clean_false_keeps_ttc_output_for_clean_looking_inputs(tiny, batch):
    x, _ = batch
    d = scc.defend(tiny, "scc", correct_clean=False, warmup__tau_thres=0.0)  # every input looks clean
    draws = d.draws(x)
    ttc_logits = ttc(tiny, x, d.config.warmup, draws["start"])
    assert torch.equal(d(x, draws), ttc_logits)

"""scc.draws and the Defense record: draw distributions declared once, read by every backend; adding a defense."""
import dataclasses

import pytest
import torch

import scc
from scc.backends import make_runner
from scc.defenses import DEFENSES, Defense
from scc.draws import Draw, draw_shapes, make_draws
from scc.errors import SccError


def test_every_kind_has_its_distribution():
    """Each kind's shape, support and first two moments: a wrong distribution (e.g. a normal where a uniform or an
    Exp(1) belongs, an unnormalised Dirichlet, a biased sign) fails one of them."""
    specs = {"u": Draw("uniform", -2.0, 3.0), "n": Draw("normal"), "i": Draw("integers", 1, 4, lambda c, im: (50,)),
             "d": Draw("dirichlet", shape=lambda c, im: (400, 3)), "s": Draw("sign", shape=lambda c, im: (400,))}
    x = torch.rand(6, 3, 5, 5)
    d = make_draws(specs, None, x, torch.Generator().manual_seed(0))
    u = d["u"]
    assert u.shape == x.shape and -2 <= u.min() and u.max() < 3
    assert abs(u.mean() - 0.5) < 0.2 and abs(u.std() - 5 / 12 ** 0.5) < 0.15  # U(-2, 3): mean 0.5, std 1.44
    assert d["n"].shape == x.shape and abs(d["n"].mean()) < 0.2 and 0.8 < d["n"].std() < 1.2
    assert d["i"].dtype == torch.int64 and set(d["i"].unique().tolist()) == {1, 2, 3}
    dirichlet = d["d"]
    assert dirichlet.shape == (6, 400, 3) and bool((dirichlet > 0).all())
    torch.testing.assert_close(dirichlet.sum(-1), torch.ones(6, 400))
    # Dirichlet(1, 1, 1): each weight has mean 1/3 and std sqrt(2/36) = 0.236
    assert (dirichlet.mean((0, 1)) - 1 / 3).abs().max() < 0.03 and abs(dirichlet.std() - 0.236) < 0.02
    assert set(d["s"].unique().tolist()) == {-1.0, 1.0} and abs(d["s"].mean()) < 0.1
    again = make_draws(specs, None, x, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[k], again[k]) for k in d)  # declaration order + one generator = reproducible
    with pytest.raises(ValueError, match="unknown draw kind"):
        Draw("cauchy")


def test_records_declare_the_draws_their_procedures_take(tiny):
    """Each record's draws are exactly the keyword arguments its procedure takes, with the declared shapes."""
    x = torch.rand(2, 3, 32, 32)
    for name, defense in DEFENSES.items():
        d = scc.defend(tiny, name)
        draws = d.draws(x)
        assert list(draws) == list(defense.draw_specs), name
        shapes = draw_shapes(defense.draw_specs, d.config, (3, 32, 32))
        assert {k: tuple(v.shape[1:]) for k, v in draws.items()} == shapes, name
    assert draw_shapes(DEFENSES["scc"].draw_specs, scc.make_config("scc"), (3, 8, 8)) == \
        {"start": (3, 8, 8), "noise": (4, 3, 8, 8)}


def test_a_new_defense_is_one_file_and_one_record(tiny, monkeypatch):
    """What the README's Architecture section promises: a config, a procedure with its draws, one Defense entry."""

    @dataclasses.dataclass(frozen=True)
    class ShiftConfig:
        eps: float = 2 / 255

    def shift(clf, x, cfg, offset, trace=None):  # predict on x moved by a random offset in [-eps, eps]
        return clf((x + cfg.eps * offset).clamp(0, 1))

    record = Defense("shift", ShiftConfig, shift, {"offset": Draw("uniform", -1.0, 1.0)},
                     presets={"paper": {}, "wide": {"eps": 8 / 255}}, compiles=False, exports=False,
                     why_not="a test defense")
    monkeypatch.setitem(DEFENSES, "shift", record)
    monkeypatch.setitem(scc.PRESETS, "shift", record.presets)
    x = torch.rand(3, 3, 32, 32)
    d = scc.defend(tiny, "shift-wide", seed=1)
    assert d.config.eps == 8 / 255 and d.spec == "shift-wide"
    draws = d.draws(x)
    want = tiny((x + 8 / 255 * draws["offset"]).clamp(0, 1))
    torch.testing.assert_close(make_runner(d, "eager")(x, draws), want)
    with pytest.raises(SccError, match="backend compiled cannot run shift-wide: a test defense"):
        make_runner(d, "compiled")


def test_default_randomness_is_secret_and_fresh(tiny):
    x = torch.rand(2, 3, 32, 32)
    a, b = scc.defend(tiny, "ttc"), scc.defend(tiny, "ttc")
    assert a.seed is None and b.seed is None and "seed=secret" in repr(a)
    assert not torch.equal(a.draws(x)["start"], b.draws(x)["start"])
    c, d = scc.defend(tiny, "ttc", seed=3), scc.defend(tiny, "ttc", seed=3)
    assert torch.equal(c.draws(x)["start"], d.draws(x)["start"])
    with pytest.raises(SccError, match=r"seed must be an integer in \[0, 2\*\*63\) or None"):
        scc.defend(tiny, "ttc", seed="abc")


def test_draws_depend_on_seed_and_key_not_on_the_batch(tiny, digits):
    """One image alone vs at position 5 of a batch of 8, same seed and key: same draws, same logits."""
    x = digits[0][:8]
    keys = [f"req-{i}" for i in range(8)]
    for name in ("ttc", "scc"):
        batch = scc.defend(tiny, name, seed=11)
        alone = scc.defend(tiny, name, seed=11)
        d8, d1 = batch.draws(x, keys), alone.draws(x[5:6], keys[5:6])
        assert all(torch.equal(d8[k][5:6], d1[k]) for k in d8), name
        with torch.no_grad():
            out8, out1 = batch(x, d8), alone(x[5:6], d1)
        torch.testing.assert_close(out8[5:6], out1, atol=1e-4, rtol=0)
        assert out8[5].argmax() == out1[0].argmax()
    # the running index: a dataset fed in order gets its index as key, whatever the batch size
    a, b = scc.defend(tiny, "scc", seed=2), scc.defend(tiny, "scc", seed=2)
    whole = a.draws(x)["noise"]
    parts = torch.cat([b.draws(x[:3])["noise"], b.draws(x[3:])["noise"]])
    assert torch.equal(whole, parts) and b.next_key == 8
    with pytest.raises(SccError, match="one per image, got 2 keys for 8 images"):
        a.draws(x, keys=[1, 2])


def test_perturbation_is_the_one_the_prediction_uses(tiny, digits):
    x = digits[0][:4]
    for name, preset in (("ttc", "paper"), ("scc", "latency"), ("none", "paper")):
        d = scc.defend(tiny, name, preset=preset, seed=0)
        draws = d.draws(x)
        delta = d.perturbation(x, draws)
        assert delta.shape == x.shape and delta.abs().max() <= 4 / 255 + 1e-6
        assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6
        if name == "ttc":  # TTC predicts from x + Delta with the plain classifier
            torch.testing.assert_close(tiny(x + delta), d(x, draws))
        if name == "none":
            assert delta.abs().max() == 0


def test_example_inputs_leave_the_module_generator_alone(tiny):
    d = scc.defend(tiny, "scc", seed=3)
    before = d.draws(torch.rand(2, 3, 32, 32))["start"]
    d.reseed(3)
    x, draws = d.example_inputs(4)
    assert x.shape == (4, 3, 32, 32) and draws["noise"].shape == (4, 4, 3, 32, 32)
    assert torch.equal(d.draws(torch.rand(2, 3, 32, 32))["start"], before)
    x2, draws2 = d.example_inputs(4)
    assert torch.equal(x, x2) and torch.equal(draws["start"], draws2["start"])  # reproducible

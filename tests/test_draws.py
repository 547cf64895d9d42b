"""scc.draws and the Defense record: draw distributions declared once, read by every backend; adding a defense."""
import dataclasses

import pytest
import torch

import scc
from scc.backends import make_runner
from scc.defenses import DEFENSES, Defense
from scc.draws import Draw, draw_shapes, make_draws
from scc.models import SccError


def test_every_kind_has_its_distribution():
    specs = {"u": Draw("uniform", -2.0, 3.0), "n": Draw("normal"), "i": Draw("integers", 1, 4, lambda c, im: (50,)),
             "d": Draw("dirichlet", shape=lambda c, im: (7, 3)), "s": Draw("sign", shape=lambda c, im: (40,))}
    x = torch.rand(6, 3, 5, 5)
    d = make_draws(specs, None, x, torch.Generator().manual_seed(0))
    assert d["u"].shape == x.shape and -2 <= d["u"].min() and d["u"].max() < 3 and d["u"].std() > 0.5
    assert d["n"].shape == x.shape and abs(d["n"].mean()) < 0.2 and 0.8 < d["n"].std() < 1.2
    assert d["i"].dtype == torch.int64 and set(d["i"].unique().tolist()) == {1, 2, 3}
    torch.testing.assert_close(d["d"].sum(-1), torch.ones(6, 7)) and (d["d"] > 0).all()
    assert set(d["s"].unique().tolist()) == {-1.0, 1.0}
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
    assert d.config.eps == 8 / 255 and d.label == "shift-wide"
    draws = d.draws(x)
    want = tiny((x + 8 / 255 * draws["offset"]).clamp(0, 1))
    torch.testing.assert_close(make_runner(d, "eager")(x, draws), want)
    with pytest.raises(SccError, match="backend compiled cannot run shift-wide: a test defense"):
        make_runner(d, "compiled")

"""RN (random noise, TTC's Table 1 baseline): the procedure against an independent formula, its draws secret and
per image exactly like the other defenses', and the backends fed identical draws."""
import pytest
import torch
import torch.nn as nn

import scc
from scc.backends import make_runner
from scc.defenses import DEFENSES
from scc.metrics import top1_agreement
from scc.models import ZeroShotClassifier


def test_prediction_is_the_noisy_image_of_ttcs_random_start(tiny, digits):
    """x + clip(4/255 * u) clamped to [0,1], one forward; the same noise TTC starts from for the same u."""
    x = digits[0][:6]
    d = scc.defend(tiny, "rn", seed=0)
    draws = d.draws(x, keys=range(6))
    u = draws["noise"]
    assert u.shape == x.shape and -1 <= u.min() and u.max() < 1 and u.std() > 0.5  # U(-1, 1): std 0.577
    want_img = torch.minimum(torch.maximum(x + 4 / 255 * u, torch.zeros_like(x)), torch.ones_like(x))
    with torch.no_grad():
        torch.testing.assert_close(d(x, draws), tiny(want_img), atol=1e-5, rtol=0)
    delta = d.perturbation(x, draws)
    assert delta.abs().max() <= 4 / 255 + 1e-7 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert delta.abs().max() > 3.5 / 255  # the noise fills the ball
    # TTC's random start d0 for the same u is this perturbation (what TTC keeps when tau >= its threshold)
    from scc.defenses.ttc import TTCConfig, counterattack
    delta_ttc, _ = counterattack(tiny, x, TTCConfig(tau_thres=0.0), start=u)
    torch.testing.assert_close(delta_ttc, delta)
    assert DEFENSES["ttc"].draw_specs["start"] == DEFENSES["rn"].draw_specs["noise"]
    assert scc.defenses.expected_passes("rn", "paper")["image_forwards"] == 1
    assert scc.defend(tiny, "rn", eps=0.0)(x).argmax(1).tolist() == tiny(x).argmax(1).tolist()


@pytest.mark.parametrize("name", ["rn", "ttc"])
def test_draws_are_secret_and_per_image_like_every_defense(tiny, digits, name):
    """The same rules for RN as for TTC (the reference): secret by default, reproducible with a seed, and an image's
    draws a function of (seed, key) alone: alone or at position 5 of 8 it gets the same noise and the same logits."""
    x = digits[0][:8]
    key = "noise" if name == "rn" else "start"
    a, b = scc.defend(tiny, name), scc.defend(tiny, name)
    assert a.seed is None and "seed=secret" in repr(a)
    assert not torch.equal(a.draws(x)[key], b.draws(x)[key])  # two secret seeds
    c, d = scc.defend(tiny, name, seed=5), scc.defend(tiny, name, seed=5)
    keys = [f"req-{i}" for i in range(8)]
    d8, d1 = c.draws(x, keys), d.draws(x[5:6], keys[5:6])
    assert torch.equal(d8[key][5:6], d1[key])
    assert not torch.equal(d8[key][0], d8[key][1])  # one draw per image, not one per batch
    with torch.no_grad():
        torch.testing.assert_close(c(x, d8)[5:6], d(x[5:6], d1), atol=1e-5, rtol=0)
    other = scc.defend(tiny, name, seed=6).draws(x, keys)[key]
    assert not torch.equal(other, d8[key])  # the seed is the key to the draws
    whole = scc.defend(tiny, name, seed=5).draws(x)[key]  # the running index: batches of 3 + 5 = one batch of 8
    split = scc.defend(tiny, name, seed=5)
    assert torch.equal(whole, torch.cat([split.draws(x[:3])[key], split.draws(x[3:])[key]]))


def test_every_backend_replays_the_draws(tiny, digits, tmp_path):
    """eager and ONNX Runtime (draws as inputs) agree image by image on a toy encoder, in the logits and in every
    top-1 answer; compiled and triton in the compile lane."""
    pytest.importorskip("onnxruntime")
    from scc.export import OrtDefended, export_onnx

    torch.manual_seed(0)
    visual = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.GELU(), nn.Flatten(), nn.Linear(256, tiny.text.shape[1]))
    toy = ZeroShotClassifier(visual, tiny.text, logit_scale=tiny.logit_scale, image_size=32, labels=tiny.labels)
    defended = scc.defend(toy, "rn", seed=0)
    x = digits[0][:5]
    draws = defended.draws(x)
    ref = make_runner(defended, "eager")(x, draws)
    export_onnx(defended, tmp_path / "rn.onnx", draws_as_inputs=True)
    out = torch.as_tensor(OrtDefended(tmp_path / "rn.onnx", threads=1)(x, draws))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert top1_agreement(out, ref) == 1.0


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_compiled_engine_replays_the_draws(tiny, digits, backend):
    """The compiled engine and the triton backend (on a CPU its kernels fall back to the torch reference, with a
    warning) replay the eager module's draws: the same logits and every top-1 answer the same."""
    import warnings

    from scc.backends.compiled import Engine

    defended = scc.defend(tiny, "rn", seed=0)
    x = digits[0][:3]
    draws = defended.draws(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*backend='triton'.* runs its reference")
        engine = Engine(defended, backend=backend, max_batch=4)
    engine.warmup(4)
    out, ref = engine(x, draws), defended(x, draws)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert top1_agreement(out, ref) == 1.0

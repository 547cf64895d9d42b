"""scc.backends.make_runner: every backend against the eager module on identical draws (top-1), and its refusals."""
import sys

import pytest
import torch

import scc
from scc.backends import BackendUnavailable, make_runner
from scc.errors import SccError


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batch(digits):
    return digits[0][:6], digits[1][:6]


def check_runner(runner, defended, x, tiny, backend):
    assert runner.compile_seconds > 0 and runner.backend == backend and runner.spec == defended.spec
    draws = defended.draws(x)
    with torch.no_grad():
        out, ref = runner(x, draws), defended(x, draws)
    assert out.shape == ref.shape == (len(x), 10)
    assert torch.equal(out.argmax(1), ref.argmax(1)), (out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)  # logits are 100 * cosine
    defended.reseed(5)  # draws=None: the defended module's own per-image draws, as in eager
    a = runner(x)
    defended.reseed(5)
    assert torch.equal(a.argmax(1), defended(x).argmax(1))


@pytest.mark.compile
def test_compiled_runner_matches_eager_on_identical_draws(tiny, batch):
    """A one-step TTC (a small graph) at batch 2, the graph test_compiled.py's bucket test compiles too (Inductor's
    cache then serves the second): 5 images run as two full chunks and a padded one."""
    x, _ = batch
    defended = scc.defend(tiny, "ttc", seed=1, steps=1)
    check_runner(make_runner(defended, "compiled", batch_size=2), defended, x[:5], tiny, "compiled")


def test_onnx_runner_feeds_the_file_eager_draws(tiny, batch, onnx_dynamic, monkeypatch):
    """make_runner's ONNX path around the session's exported SCC-latency file (copied, not exported again): the
    runner feeds the eager module's draws, and ORT makes the same per-image draws from (seed, key)."""
    import shutil

    from scc.export import OrtDefended

    _, info = onnx_dynamic
    calls = []

    def copy_export(defended, path, **kwargs):
        calls.append(kwargs)
        shutil.copy(info["path"], path)
        return {**info, "path": str(path), "seconds": 1.0}

    monkeypatch.setattr("scc.export.export_onnx", copy_export)
    x, _ = batch
    defended = scc.defend(tiny, "scc", preset="latency", seed=1)
    runner = make_runner(defended, "onnx", batch_size=4)
    assert calls == [{"batch_size": 4, "draws_as_inputs": True}]
    check_runner(runner, defended, x, tiny, "onnx")
    ort = OrtDefended(runner.details["onnx"], seed=9)
    alone = scc.defend(tiny, "scc", preset="latency", seed=9)
    torch.testing.assert_close(ort(x[5:6], keys=["k5"]), alone(x[5:6], keys=["k5"]), atol=1e-3, rtol=0)
    torch.testing.assert_close(ort(x, keys=[f"k{i}" for i in range(6)])[5:6], alone(x[5:6], keys=["k5"]),
                               atol=1e-3, rtol=0)


def test_eager_runner_is_the_module(tiny, batch):
    x, _ = batch
    defended = scc.defend(tiny, "scc", preset="latency")
    runner = make_runner(defended, "eager", 3)
    draws = defended.draws(x)
    assert runner.compile_seconds is None and runner.spec == "scc-latency"
    assert torch.equal(runner(x, draws), defended(x, draws))


def test_refusals_are_up_front_and_clear(tiny, monkeypatch):
    rtpt = scc.defend(tiny, "rtpt")
    for backend in ("compiled", "triton", "onnx"):
        with pytest.raises(BackendUnavailable, match=f"backend {backend} cannot run rtpt: R-TPT tunes"):
            make_runner(rtpt, backend, 1)
    ttc = scc.defend(tiny, "ttc")
    with pytest.raises(BackendUnavailable, match="backend onnx runs fp32 files here"):
        make_runner(ttc, "onnx", 1, dtype=torch.bfloat16)
    with pytest.raises(SccError, match="the model is on cpu, not meta"):
        make_runner(ttc, "eager", 1, device="meta")
    with pytest.raises(SccError, match="batch size must be a positive integer, got 0"):
        make_runner(ttc, "eager", 0)
    with pytest.raises(SccError, match="unknown backend 'tensorrt'"):
        make_runner(ttc, "tensorrt", 1)
    monkeypatch.setitem(sys.modules, "scc.backends.compiled", None)  # import scc.backends.compiled -> ImportError
    with pytest.raises(BackendUnavailable, match="backend compiled is not available") as err:
        make_runner(ttc, "compiled", 1)
    assert isinstance(err.value.__cause__, ImportError)


def test_bf16_eager_runner_keeps_the_answers(tiny, digits):
    """The reduced-precision tower (weights and activations bf16; perturbation, steps, losses fp32) on 64
    held-out digits: top-1 agreement with fp32 at least 0.95 on identical draws."""
    x = digits[0][:64]
    defended = scc.defend(tiny, "ttc")
    draws = defended.draws(x)
    with torch.no_grad():
        ref = defended(x, draws).argmax(1)
        out = make_runner(defended, "eager", 64, dtype=torch.bfloat16)(x, draws).argmax(1)
    agree = (out == ref).float().mean().item()
    assert agree >= 0.95, agree

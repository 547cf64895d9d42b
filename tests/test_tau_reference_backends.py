"""TTC's tau gate on a fine-tuned model's frozen original (`tau_reference`) on every backend: the compiled engine,
the triton backend, ONNX Runtime and the reduced-precision eager copy gate on the original exactly as eager does,
fed identical draws (top-1 and per-step sign agreement), and not on the tuned model.

A toy encoder (a patch convolution and a linear layer) stands in for the tuned model; its original is the same
encoder before a small weight drift. The gate threshold is set between the two models' tau values, so the gate
decides differently for several images depending on which model it reads: a backend that dropped the reference
would fail the comparison with eager.
"""
import copy

import pytest
import torch
import torch.nn as nn

import scc
from scc.backends import make_runner
from scc.defenses.ttc import TTCConfig, counterattack
from scc.metrics import top1_agreement
from scc.models import ZeroShotClassifier


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tiny, digits):
    """(tuned classifier carrying tau_reference, the same without it, images, tau threshold)."""
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.GELU(), nn.Flatten(), nn.Linear(256, tiny.text.shape[1]))
    original = ZeroShotClassifier(visual, tiny.text, logit_scale=tiny.logit_scale, image_size=32, labels=tiny.labels,
                                  name="toy")
    tuned = copy.deepcopy(original)
    with torch.no_grad():
        for p in tuned.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = digits[0][:6]
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, tau_own = counterattack(tuned, x, TTCConfig(), start)
    gated = copy.deepcopy(tuned)
    gated.tau_reference = original
    _, tau_ref = counterattack(gated, x, TTCConfig(), start)
    # the threshold between two sorted tau values that makes the two gates disagree on the most images
    values = sorted(torch.cat([tau_own, tau_ref]).tolist())
    cuts = [(a + b) / 2 for a, b in zip(values, values[1:])]
    thres = max(cuts, key=lambda t: ((tau_own < t) != (tau_ref < t)).sum().item())
    assert ((tau_own < thres) != (tau_ref < thres)).sum() >= 2, (tau_own, tau_ref)
    return gated, tuned, x, thres


def signs(a, b):
    assert len(a) == len(b) > 0
    return min((u == v).float().mean().item() for u, v in zip(a, b))


def eager(setup, steps=2):
    """(defended with the reference, eager logits and step signs on identical draws, the same without the
    reference, draws)."""
    gated, tuned, x, thres = setup
    defended = scc.defend(gated, "ttc", seed=0, steps=steps, tau_thres=thres)
    draws = defended.draws(x)
    trace = []
    ref = defended(x, draws, trace=trace)
    plain = scc.defend(tuned, "ttc", seed=0, steps=steps, tau_thres=thres)(x, draws)
    # the precondition of every comparison below: the gate's model shows in the logits
    assert not torch.allclose(ref, plain, atol=0.05, rtol=0), (ref - plain).abs().max()
    return defended, ref, trace, plain, draws


def agrees(out, ref, plain):
    assert top1_agreement(out, ref) == 1.0
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)
    assert not torch.allclose(out, plain, atol=0.05, rtol=0)  # the tuned model's own gate gives other logits


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_compiled_engine_gates_on_the_frozen_original(setup, backend):
    from scc.backends.compiled import Engine

    defended, ref, ref_trace, plain, draws = eager(setup)
    engine = Engine(defended, backend=backend, max_batch=8)
    trace = []
    out = engine(setup[2], draws, trace=trace)
    agrees(out, ref, plain)
    assert len(trace) == len(ref_trace) == 2 and signs(trace, ref_trace) >= 0.999
    runner = make_runner(defended, backend, batch_size=8)  # the path `scc eval --backend` takes
    agrees(runner(setup[2], draws), ref, plain)


def test_onnx_file_gates_on_the_frozen_original(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    from scc.export import OrtDefended, export_onnx

    defended, ref, ref_trace, plain, draws = eager(setup)
    export_onnx(defended, tmp_path / "ttc.onnx", draws_as_inputs=True, trace_outputs=True)
    trace = []
    out = torch.as_tensor(OrtDefended(tmp_path / "ttc.onnx", threads=1)(setup[2], draws, trace=trace))
    agrees(out, ref, plain)
    assert signs([torch.as_tensor(t) for t in trace], ref_trace) >= 0.999


def test_reduced_precision_copy_keeps_the_reference(setup):
    """Defended.with_dtype (eager bf16 and the exporter's reduced towers) re-assembles the reference too."""
    defended = eager(setup)[0]
    for export in (False, True):
        low = defended.with_dtype(torch.bfloat16, export=export)
        reference = low.classifier.tau_reference
        assert reference is not None and reference is not defended.classifier.tau_reference
        assert torch.bfloat16 in {q.dtype for q in reference.visual.parameters()}
    assert low.with_dtype(torch.float32).classifier.tau_reference is defended.classifier.tau_reference


def test_package_key_names_the_reference(setup):
    """An AOTInductor package of a gated model is never served for the same weights without the gate."""
    from scc.backends.packages import package_key

    gated, tuned, _, thres = setup
    with_ref = package_key(scc.defend(gated, "ttc", seed=0, tau_thres=thres), 1, torch.float32)
    without = package_key(scc.defend(tuned, "ttc", seed=0, tau_thres=thres), 1, torch.float32)
    assert "tau_reference" in with_ref and "tau_reference" not in without
    assert {k: v for k, v in with_ref.items() if k != "tau_reference"} == without

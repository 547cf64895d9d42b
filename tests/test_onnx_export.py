"""ONNX export of the whole defended procedure (scc.export): parity with eager PyTorch on identical draws.

Default run: the bundled tiny model, TTC (paper) and SCC (latency) exported at batch 50 with the draws as
inputs, evaluated on the 450 held-out digits, clean and under PGD-10 at eps 4/255 against the undefended
classifier. `pytest -m slow` adds the full-size backbones (random weights, offline).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scc
import scc.attacks
from scc.export import OrtDefended, export_onnx
from scc.export.cli import main as export_main

pytest.importorskip("onnxruntime")

BATCH = 50  # 450 held-out digits = 9 full chunks


@pytest.fixture(scope="module")
def clf(tiny):
    return tiny


@pytest.fixture(scope="module")
def attacked(clf, digits):
    """The held-out digits and their PGD-10 (eps 4/255) images against the undefended classifier."""
    x, y = digits
    x_adv = scc.attacks.pgd(clf, x, y, eps=4 / 255, alpha=1 / 255, steps=10,
                            generator=torch.Generator().manual_seed(0))
    return x, y, x_adv


@pytest.fixture(scope="module", params=[("ttc", "paper"), ("scc", "latency")], ids=["ttc", "scc-latency"])
def exported(request, clf, tmp_path_factory):
    name, preset = request.param
    defended = scc.defend(clf, name, preset=preset)
    path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
    info = export_onnx(defended, path, batch_size=BATCH, draws_as_inputs=True, trace_outputs=True)
    return defended, info, OrtDefended(path)


@pytest.fixture(scope="module")
def eager_adv_accuracy():
    """(defense, preset) -> eager accuracy on the PGD images, filled by whichever test computes it first."""
    return {}


def accuracy(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


def test_graph_shape(exported):
    defended, info, _ = exported
    assert info["inputs"] == ["pixels", *defended.draws(torch.zeros(1, 3, 32, 32))]
    assert info["outputs"][0] == "logits" and len(info["outputs"]) == 3  # logits + one sign per step (2 steps)
    assert info["control_flow_nodes"] == 0
    assert info["scatter_nodes"] == 0  # CLS-token / qkv select backward is a Pad, not a ScatterElements
    assert info["ops"].get("ConvTranspose", 0) >= 1  # the patch embedding's input gradient
    assert not any(op.startswith("Random") for op in info["ops"])


def test_parity_with_eager(exported, attacked, eager_adv_accuracy):
    """Same draws -> same per-step gradient signs and top-1, clean and adversarial; robust accuracy kept."""
    defended, _, ort_defended = exported
    x, y, x_adv = attacked
    with torch.no_grad():
        undefended_adv = accuracy(defended.classifier(x_adv), y)
    for images in (x, x_adv):
        draws = defended.draws(images)
        trace_eager, trace_ort = [], []
        eager = defended(images, draws, trace=trace_eager)
        ort = ort_defended(images, draws, trace=trace_ort)
        assert ort.shape == eager.shape and ort.dtype == torch.float32
        assert (ort.argmax(1) == eager.argmax(1)).float().mean().item() >= 0.99
        assert len(trace_ort) == len(trace_eager) == 2
        for step, (a, b) in enumerate(zip(trace_eager, trace_ort)):
            assert (a == b).float().mean().item() >= 0.999, f"step {step} signs differ"
        assert abs(accuracy(ort, y) - accuracy(eager, y)) <= 0.01
    eager_adv_accuracy[defended.defense, defended.preset] = accuracy(eager, y)
    robust = accuracy(ort, y)
    assert robust >= undefended_adv + 0.3, (robust, undefended_adv)


def test_numpy_input_and_ragged_batch(exported):
    """numpy in, torch out; 7 images on a batch-50 file (padding) and 57 (a full chunk + a padded one)."""
    defended, _, ort_defended = exported
    x = torch.rand(57, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    draws = defended.draws(x)
    full = ort_defended(x.numpy(), {k: v.numpy() for k, v in draws.items()})
    assert isinstance(full, torch.Tensor) and full.shape == (57, 10)
    part = ort_defended(x[:7], {k: v[:7] for k, v in draws.items()})
    torch.testing.assert_close(part, full[:7], rtol=0, atol=1e-4)


def test_shape_and_dtype_errors(exported):
    _, _, ort_defended = exported
    with pytest.raises(scc.SccError, match=r"expected shape \(N, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        ort_defended(torch.rand(2, 3, 28, 28))
    with pytest.raises(scc.SccError, match="expected dtype float32, got float64"):
        ort_defended(np.random.rand(2, 3, 32, 32))
    with pytest.raises(scc.SccError, match="expected dtype float32, got uint8.*255"):
        ort_defended(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(scc.SccError, match=r"start: expected 2 rows"):
        ort_defended(torch.rand(2, 3, 32, 32), {"start": torch.rand(3, 3, 32, 32), "noise": torch.randn(3, 4, 3, 32, 32)})


def test_cli_in_graph_random_keeps_accuracy(clf, attacked, eager_adv_accuracy, tmp_path, capsys):
    """`scc export onnx` without --draws-as-inputs: start/noise are drawn inside the graph by ORT's own
    generator, so the check is accuracy, not bit parity."""
    x, y, x_adv = attacked
    out = tmp_path / "scc.onnx"
    assert export_main(["onnx", "--model", "scc-tiny-digits", "--defense", "scc", "--preset", "latency",
                        "--batch-size", str(BATCH), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ort_defended = OrtDefended(out)
    assert list(ort_defended.inputs) == ["pixels"] and ort_defended.output_names == ["logits"]
    assert ort_defended.batch_size == BATCH and ort_defended.labels == clf.labels
    assert ort_defended.metadata["scc.defense"] == "scc" and ort_defended.metadata["scc.preset"] == "latency"
    defended = scc.defend(clf, "scc", preset="latency")
    with pytest.raises(scc.SccError, match="inside the graph"):
        ort_defended(x[:2], defended.draws(x[:2]))
    first, second = ort_defended(x_adv[:BATCH]), ort_defended(x_adv[:BATCH])
    assert not torch.equal(first, second)  # fresh draws on every run
    if ("scc", "latency") not in eager_adv_accuracy:
        eager_adv_accuracy["scc", "latency"] = accuracy(defended(x_adv), y)
    eager, ort = eager_adv_accuracy["scc", "latency"], accuracy(ort_defended(x_adv), y)
    assert abs(ort - eager) <= 0.04, (ort, eager)
    assert accuracy(ort_defended(x), y) >= 0.95


def test_user_errors(clf, tmp_path, capsys):
    assert export_main(["onnx", "--model", "scc-tiny-digits", "--defense", "ttc", "--preset", "latency",
                        "--out", str(tmp_path / "x.onnx")]) == 2
    assert "unknown preset 'latency' for ttc" in capsys.readouterr().err
    assert export_main(["onnx", "--model", "scc-tiny-digits", "--defense", "scc",
                        "--out", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(scc.SccError, match="batch_size must be a positive integer, got 0"):
        export_onnx(scc.defend(clf, "ttc"), tmp_path / "x.onnx", batch_size=0)
    with pytest.raises(scc.SccError, match="does not exist"):
        OrtDefended(tmp_path / "nothing.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ViT-B-32", "ViT-B-16", "RN50"])
def test_full_size_backbone_exports(model, tmp_path):
    """Random weights (offline): the TTC procedure exports and matches eager on identical draws."""
    torch.manual_seed(0)
    clf = scc.load(model, None, ["cat", "dog", "car"])
    defended = scc.defend(clf, "ttc")
    info = export_onnx(defended, tmp_path / f"{model}.onnx", batch_size=1, draws_as_inputs=True, trace_outputs=True)
    assert info["control_flow_nodes"] == 0 and info["scatter_nodes"] == 0
    ort_defended = OrtDefended(info["path"])
    x = torch.rand(2, 3, clf.image_size, clf.image_size, generator=torch.Generator().manual_seed(0))
    draws = defended.draws(x)
    trace_eager, trace_ort = [], []
    eager = defended(x, draws, trace=trace_eager)
    ort = ort_defended(x, draws, trace=trace_ort)
    assert torch.equal(ort.argmax(1), eager.argmax(1))
    for a, b in zip(trace_eager, trace_ort):
        assert (a == b).float().mean().item() >= 0.99

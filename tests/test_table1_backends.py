"""Table 1's defenses (anti-adv, hd, doc, dbd, agc) on the compiled engine and ONNX Runtime against eager, fed
identical draws: top-1 agreement and, for the gradient defenses, per-step sign agreement.

Default run: the gradient defenses' small variants (one gradient step) on a toy encoder (a patch convolution and a
linear layer: their graphs compile and export in seconds, the tiny ViT's transformer takes 10-60 s per graph),
compiled and exported. DBD and AGC: their augmentations cost 25-40 s of Inductor C++ compilation and ~20 s of
export each even on the toy encoder (cold cache, 2 shared cores), so the default run only checks that their whole
procedure is captured as one graph (dynamo fullgraph, no Inductor) and traced by make_fx (the exporter's first
stage) with the eager result; `pytest -m slow` compiles and exports their small variants, and every full preset on
the bundled tiny ViT.
"""
import pytest
import torch
import torch.nn as nn

import scc
from scc.backends.compiled import Engine
from scc.metrics import top1_agreement
from scc.models import ZeroShotClassifier

SMALL = {"anti-adv": {"steps": 1}, "hd": {"steps": 2}, "doc": {"steps": 1, "copies": 2},
         "dbd": {"crops": 2, "noise_views": 1, "keep": 4, "jpeg_qualities": (75,)}, "agc": {"views": 3}}
STEPS = {"anti-adv": 1, "hd": 1, "doc": 1, "dbd": 0, "agc": 0}


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tiny):
    """A 32x32 zero-shot classifier with a conv-patch + linear encoder and the digits model's text embeddings."""
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.GELU(), nn.Flatten(), nn.Linear(256, tiny.text.shape[1]))
    return ZeroShotClassifier(visual, tiny.text, logit_scale=tiny.logit_scale, image_size=32, labels=tiny.labels,
                              name="toy")


def signs(a, b):
    assert len(a) == len(b)
    return [(x == y).float().mean().item() for x, y in zip(a, b)]


def check_compiled(defended, x, steps):
    draws = defended.draws(x)
    ref_trace, trace = [], []
    ref = defended(x, draws, trace=ref_trace)
    engine = Engine(defended, max_batch=2)
    out = engine(x, draws, trace=trace if steps else None)  # 5 images: chunks of 2, 2 and 1 (padded)
    report = f"top-1 {top1_agreement(out, ref):.3f}, signs {signs(trace, ref_trace) if steps else '-'}"
    assert len(ref_trace) == steps and top1_agreement(out, ref) == 1.0, report
    if steps:
        assert min(signs(trace, ref_trace)) >= 0.999, report
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)


def check_onnx(defended, x, steps, path):
    from scc.export import OrtDefended, export_onnx

    info = export_onnx(defended, path, draws_as_inputs=True, trace_outputs=bool(steps))
    assert info["control_flow_nodes"] == 0 and info["dynamic_batch"]
    session = OrtDefended(path, threads=1)
    draws = defended.draws(x)
    ref_trace, trace = [], []
    ref = defended(x, draws, trace=ref_trace)
    out = torch.as_tensor(session(x, draws, trace=trace if steps else None))
    assert top1_agreement(out, ref) == 1.0
    if steps:
        assert min(signs([torch.as_tensor(t) for t in trace], ref_trace)) >= 0.999
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)
    return info


FORWARD_ONLY = [pytest.param("dbd", marks=pytest.mark.slow), pytest.param("agc", marks=pytest.mark.slow)]


@pytest.mark.compile
@pytest.mark.parametrize("name", ["anti-adv", "hd", "doc", *FORWARD_ONLY])
def test_small_variant_compiled(toy, digits, name):
    check_compiled(scc.defend(toy, name, seed=0, **SMALL[name]), digits[0][:5], STEPS[name])


@pytest.mark.parametrize("name", ["anti-adv", "hd", "doc", *FORWARD_ONLY])
def test_small_variant_onnx(toy, digits, name, tmp_path):
    pytest.importorskip("onnxruntime")
    info = check_onnx(scc.defend(toy, name, seed=0, **SMALL[name]), digits[0][:5], STEPS[name],
                      tmp_path / f"{name}.onnx")
    assert info["scatter_nodes"] == 0


@pytest.mark.compile
@pytest.mark.parametrize("name", ["dbd", "agc"])
def test_forward_only_is_one_graph_and_traceable(toy, digits, name):
    """The whole procedure captured by dynamo with fullgraph=True (no graph break: what the compiled engine needs)
    and traced by make_fx with static shapes (what the ONNX exporter exports), both equal to eager."""
    from scc.export.onnx import trace_procedure

    defended = scc.defend(toy, name, seed=0, **SMALL[name])
    x = digits[0][:2]
    draws = defended.draws(x)
    ref = defended(x, draws)
    keys = sorted(draws)
    fn = lambda x, *d: defended.record.procedure(toy, x, defended.config, **dict(zip(keys, d)))
    torch._dynamo.reset()
    captured = torch.compile(fn, backend="eager", fullgraph=True)(x, *(draws[k] for k in keys))
    torch.testing.assert_close(captured, ref, atol=1e-5, rtol=0)
    graph, example, names, _ = trace_procedure(defended, batch_size=2)
    traced = graph(x, *(draws[n] for n in names[1:]))
    torch.testing.assert_close(traced, ref, atol=1e-5, rtol=0)


FULL = ["anti-adv", "anti-adv-ttc-budget", "hd", "hd-ttc-budget", "doc", "dbd", "agc"]
FULL_STEPS = {"anti-adv": 2, "anti-adv-ttc-budget": 2, "hd": 19, "hd-ttc-budget": 1, "doc": 4, "dbd": 0, "agc": 0}


@pytest.mark.slow
@pytest.mark.parametrize("label", FULL)
def test_full_preset_compiled_tiny_vit(tiny, digits, label):
    check_compiled(scc.defend(tiny, label, seed=0), digits[0][:5], FULL_STEPS[label])


@pytest.mark.slow
@pytest.mark.parametrize("label", FULL)
def test_full_preset_onnx_tiny_vit(tiny, digits, label, tmp_path):
    pytest.importorskip("onnxruntime")
    check_onnx(scc.defend(tiny, label, seed=0), digits[0][:5], FULL_STEPS[label], tmp_path / f"{label}.onnx")


def test_draws_made_inside_the_onnx_graph(toy, digits, tmp_path):
    """DOC's draws (an image-shaped uniform start, (B, M, 3, H, W) uniforms, (B, T, 3, H, W) normals) made by ONNX
    Runtime's random nodes, batch-dynamic: a file that needs no draw inputs."""
    pytest.importorskip("onnxruntime")
    from scc.export import OrtDefended, export_onnx

    defended = scc.defend(toy, "doc", seed=0, **SMALL["doc"])
    info = export_onnx(defended, tmp_path / "doc.onnx")
    assert info["inputs"] == ["pixels"]
    assert info["ops"].get("RandomUniformLike", 0) == 2 and info["ops"].get("RandomNormalLike", 0) == 1
    session = OrtDefended(tmp_path / "doc.onnx", threads=1)
    x = digits[0][:3]
    a, b = (torch.as_tensor(session(x)) for _ in range(2))
    assert a.shape == (3, 10) and torch.isfinite(a).all() and not torch.equal(a, b)  # fresh draws per run

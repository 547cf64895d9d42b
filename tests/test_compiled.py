"""scc.backends.compiled.Engine: one compiled graph per bucket, against the eager defense on identical draws.

The graphs take ~10-90 s each to compile on 2 CPU cores (cold Inductor cache), so the tests share few of them:
scc-latency traced at bucket 8 (the paper preset in `pytest -m slow`), a one-step ttc at bucket 2, and under the
Triton interpreter (in a fresh process) a small scc variant with the kernels inside the graph.
"""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import scc
from scc.backends.compiled import Engine
from scc.errors import SccError
from scc.metrics import top1_agreement


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread that gets descheduled stalls every
    parallel region of the compiled graph's hundreds of small kernels (measured 4-10x slower under load)."""
    torch.set_num_threads(1)


def sign_agreement(a: list, b: list) -> list[float]:
    assert len(a) == len(b) and a, (len(a), len(b))
    return [(x == y).float().mean().item() for x, y in zip(a, b)]


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.mark.compile
@pytest.mark.parametrize("preset, steps", [("latency", 1 + 1), pytest.param("paper", 2 + 3, marks=pytest.mark.slow)])
def test_scc_compiled_matches_eager_on_heldout(tiny, digits, preset, steps):
    """scc (latency: K_w=1, S=1; paper: K_w=2, S=3; 4 views) on 62 held-out digits: top-1 and per-step signs. (The
    whole split of 450 agreed 100.0% top-1 and 0.99999 per step for the paper preset; 62 keep the test short.)"""
    images = digits[0][:62]  # 7 chunks of 8 and one of 6, padded to 8
    defended = scc.defend(tiny, "scc", preset=preset, seed=0)
    draws = defended.draws(images)
    trace_eager, trace_engine = [], []
    eager = defended(images, draws, trace=trace_eager)

    engine = Engine(defended, backend="compiled", max_batch=8)
    breaks = graph_breaks()
    compiled = engine(images, draws, trace=trace_engine)
    assert graph_breaks() == breaks
    assert sorted(engine.trace_compile_seconds) == [8] and engine.compile_seconds == {}

    assert compiled.shape == eager.shape == (62, 10)
    agree = top1_agreement(compiled, eager)
    signs = sign_agreement(trace_engine, trace_eager)
    report = f"top-1 agreement {agree:.4f}, per-step sign agreement {[round(s, 5) for s in signs]}"
    print(report)
    assert len(signs) == steps, report  # warm-up steps + corrective steps
    assert agree == 1.0, report
    assert min(signs) >= 0.999, report
    torch.testing.assert_close(compiled, eager, atol=0.5, rtol=0)  # logits are ~100 * cosine


@pytest.mark.compile
def test_ttc_buckets_padding_and_splitting(tiny, digits):
    images, _ = digits
    defended = scc.defend(tiny, "ttc", seed=1, steps=1)  # one step: a smaller graph to compile
    engine = Engine(defended, max_batch=2)
    assert engine.buckets == [1, 2] and engine.freeze  # CPU: weights frozen into the graph by default
    packed = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would skip the passes counted here
        seconds = engine.warmup(2)
    assert seconds > 0 and engine.compile_seconds == {2: seconds}
    # freezing took effect (the weights were pre-packed for oneDNN/MKL) and was switched on for that compile only
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > packed
    assert torch._inductor.config.freezing is False
    breaks = graph_breaks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compile inside a request: bucket 2 serves every chunk
        for n in (1, 2, 5):  # padded; exact; split 2 + 2 + 1 (padded)
            x = images[10: 10 + n]
            draws = defended.draws(x)
            out, ref = engine(x, draws), defended(x, draws)
            assert out.shape == (n, 10)
            assert torch.equal(out.argmax(1), ref.argmax(1)), (n, out, ref)
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=0, msg=lambda m: f"n={n}: {m}")
    assert list(engine.compile_seconds) == [2] and graph_breaks() == breaks
    # per-image draws: an image alone (padded) and at position 5 of 8 (chunk 3 of 4) gets the same answer
    x8, keys = images[:8], list(range(100, 108))
    out8, out1 = engine(x8, keys=keys), engine(x8[5:6], keys=[105])
    torch.testing.assert_close(out8[5:6], out1, atol=1e-4, rtol=0)
    torch.testing.assert_close(out8, defended(x8, keys=keys), atol=1e-3, rtol=0)
    # the default draws come from the defended module's generator, as in eager
    defended.reseed(3)
    a = engine(images[:2])
    defended.reseed(3)
    torch.testing.assert_close(a, defended(images[:2]), atol=1e-3, rtol=0)


def test_bucket_policy(tiny):
    engine = Engine(scc.defend(tiny, "ttc"), max_batch=8)
    assert engine.buckets == [1, 2, 4, 8]
    assert Engine(scc.defend(tiny, "ttc"), max_batch=6).buckets == [1, 2, 4, 6]
    assert [engine.bucket_for(n) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]
    engine.compile_seconds[8] = 1.0  # pretend bucket 8 is compiled: small chunks then use it, nothing compiles
    assert [engine.bucket_for(n) for n in (1, 3, 8)] == [8, 8, 8]


def test_engine_rejects_bad_settings_and_inputs(tiny, digits):
    defended = scc.defend(tiny, "scc")
    for kwargs, match in [(dict(backend="onnx"), "unknown backend"), (dict(mode="fast"), "unknown compile mode"),
                          (dict(dtype=torch.float64), "dtype must be"), (dict(max_batch=0), "max_batch"),
                          (dict(mode="reduce-overhead"), "needs a CUDA model")]:
        with pytest.raises(SccError, match=match):
            Engine(defended, **kwargs)
    with pytest.raises(SccError, match="wraps a scc.defend"):
        Engine(tiny)
    engine = Engine(defended)
    x = digits[0][:2]
    with pytest.raises(SccError, match=r"pixels: expected shape \(B, 3, 32, 32\)"):
        engine(x[:, :, :16])
    with pytest.raises(SccError, match="pixels: expected dtype float32, got float64"):
        engine(x.double())
    with pytest.raises(SccError, match=r"need the keys \['noise', 'start'\], got \['start'\]"):
        engine(x, {"start": torch.zeros_like(x)})
    with pytest.raises(SccError, match="warmup takes a batch size in 1..max_batch=8"):
        engine.warmup(9)
    with pytest.raises(SccError, match=r"draw 'start' must be a tensor with 2 rows"):
        engine(x, {"start": torch.zeros(3, 3, 32, 32), "noise": torch.zeros(2, 4, 3, 32, 32)})


def test_engine_refuses_an_unsupported_defense_up_front(tiny):
    """R-TPT's record says it does not compile: refused before anything is traced, with the reason."""
    with pytest.raises(SccError, match=r"defense 'rtpt' does not run on the compiled backend: R-TPT tunes"):
        Engine(scc.defend(tiny, "rtpt"))


def test_kernels_belong_to_the_engine(tiny, digits):
    """Kernel dispatch is the engine's own: a triton engine's classifier copy carries the launchers, a compiled
    engine's and the caller's classifier carry none, and building either leaves the caller's classifier exactly as
    it was (same modules, same answers), so both engines and the eager module can serve in one process."""
    import torch.nn as nn

    from scc.kernels import sign_step

    x = digits[0][:2]
    defended = scc.defend(tiny, "ttc", seed=0)
    draws = defended.draws(x)
    before = defended(x, draws)
    modules_before = [(name, type(m)) for name, m in tiny.visual.named_modules()]
    compiled = Engine(scc.defend(tiny, "ttc"), backend="compiled")
    with warnings.catch_warnings():  # on CPU without the interpreter the launchers fall back (and warn)
        warnings.simplefilter("ignore")
        triton = Engine(scc.defend(tiny, "ttc"), backend="triton")
    assert tiny.kernels == {} and compiled.classifier.kernels == {}
    assert triton.classifier.kernels["sign_step"] is sign_step.sign_step
    assert triton.classifier.visual is not tiny.visual and compiled.classifier.visual is not tiny.visual
    # the engines re-assembled their own copies (patch conv -> matmul); the caller's tower keeps its Conv2d stem
    assert [(name, type(m)) for name, m in tiny.visual.named_modules()] == modules_before
    assert isinstance(tiny.visual.conv1, nn.Conv2d) and not isinstance(triton.classifier.visual.conv1, nn.Conv2d)
    assert torch.equal(defended(x, draws), before)  # bit for bit: the eager module is untouched


def test_triton_backend_on_cpu_falls_back_and_says_so(tiny, monkeypatch):
    from scc.kernels import sign_step, view_augment

    monkeypatch.setattr(sign_step, "INTERPRETED", False)
    monkeypatch.setattr(view_augment, "INTERPRETED", False)
    with pytest.warns(UserWarning, match="runs its reference"):
        engine = Engine(scc.defend(tiny, "scc"), backend="triton")
    assert engine.kernels["sign_step"].startswith("reference (cpu tensors need the Triton interpreter"), engine.kernels
    assert engine.kernels["view_augment"] == "reference (zoom views: the kernel has no zoom)", engine.kernels


@pytest.mark.compile
def test_triton_backend_runs_kernels_in_graph(digits, monkeypatch, kernel_device):
    """Flip views (the kernel has no zoom) and no Stages 1-2 keep the graph small: the warm-up step runs the
    sign-step kernel and the 4-view prediction the view kernel, both inside the compiled graph."""
    from scc.kernels import sign_step, view_augment

    launches = {"sign_step": 0, "view_augment": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            launches[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(sign_step, "_launch", counting("sign_step", sign_step._launch))
    monkeypatch.setattr(view_augment, "_launch_args", counting("view_augment", view_augment._launch_args))
    clf = scc.load("scc-tiny-digits", device=kernel_device)  # its own copy: the session's `tiny` stays on the CPU
    defended = scc.defend(clf, "scc", views=("id", "flip", "noise", "flip+noise"), semantic=False,
                          warmup__steps=1)
    x = digits[0][:2].to(kernel_device)
    draws = defended.draws(x)
    trace_eager, trace_engine = [], []
    eager = defended(x, draws, trace=trace_eager)
    engine = Engine(defended, backend="triton", max_batch=2)
    assert all(v.startswith("triton") for v in engine.kernels.values()), engine.kernels
    out = engine(x, draws, trace=trace_engine)
    assert launches["sign_step"] >= 1 and launches["view_augment"] >= 1, launches
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=0)
    assert min(sign_agreement(trace_engine, trace_eager)) >= 0.99



def test_gpu_check_cpu_parts():
    """benchmarks/gpu_check.py runs on a GPU machine without open_clip; its builder and row runner run here."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    clf = gpu_check.random_vit_classifier("tiny")
    assert clf.num_classes == 47 and clf.image_size == 32 and clf.clip is None
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = clf(images)
    assert logits.std(1).min() > 0.1, logits  # a real (random) embedding, not the zero vector
    reference = {}
    rows = {dtype: gpu_check.run_row(clf, images, "scc-latency", "eager", dtype, 2, None, "cpu", 2, reference)
            for dtype in ("fp32", "bf16")}
    assert [k for k in reference if isinstance(k[0], str)] == [("scc-latency", 2)]
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs_logit_diff"] == 0.0, fp32  # same module
    assert bf16["dtype"] == "bf16" and 0 < bf16["max_abs_logit_diff"] < 5.0, bf16  # bf16 rounding, not garbage
    assert fp32["p20_ms_per_image"] <= fp32["ms_per_image"] <= fp32["p80_ms_per_image"] and fp32["timed_calls"] == 2

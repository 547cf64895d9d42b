"""Every GPU number of scc in one call under a deadline: eager Table-4 rows, kernels, kernel tests, compiled rows
with CUDA graphs on and off, batch 64, ONNX. Built for a GPU machine without a package index.

    benchmarks/gpu_wheels.sh                       # here: the wheels it lacks into .whl/, and the command to run
    python3 benchmarks/gpu_check.py --plan         # the rows, their estimated seconds, which fit the deadline
    python3 benchmarks/gpu_check.py                # on the GPU machine: JSON to $OUT/gpu-check.json
    python3 benchmarks/gpu_check.py --device cpu --vit tiny --deadline-s 120      # CPU smoke of the same code

The model is CLIP ViT-B/32 from open_clip with random weights and the 47 DTD classes (R-TPT tunes its text
prompt) on uniform random pixels; `--vit tiny` is the bundled scc-tiny-digits. Without open_clip a random
torchvision ViT-B/32 image tower stands in and the R-TPT rows are skipped. With random weights top-1 agreement
compares backends on identical draws; it is not an accuracy.

Steps, most valuable first (`--steps` picks some; `--defenses` and `--dtypes` filter the rows):
  env                 versions, GPU, ONNX Runtime providers; the measured matmul peaks and memory bandwidth; the model
  eager_b1            eager batch 1, TTC / SCC-latency / SCC (paper) / R-TPT in fp32, bf16, fp16: the Table 4 analogue
  kernels             each Triton kernel vs its torch reference run eagerly and compiled by Inductor (do_bench medians)
  kernel_tests        tests/test_view_augment.py and tests/test_sign_step.py in a subprocess with a timeout
  compiled_b1         compiled batch 1, TTC and SCC-latency, bf16 then fp32: one compile (mode=None) timed as it is
                      and captured in a torch.cuda.CUDAGraph (CUDA graphs off and on)
  batch64             eager and compiled at --batch (64) images per call
  scc_paper_compiled  SCC (paper preset) compiled, batch 1
  onnx                ORT's CUDA provider (IOBinding vs CUDA graph); skipped at once without CUDAExecutionProvider
  onnx_cpu            ORT on the CPU cores (TTC fp32, batch 1), if time is left

Rows run in this order while the deadline allows: a row whose estimated seconds exceed the time left is skipped
(a later, cheaper one may still run) and, at the deadline itself, the row in progress is cut, the JSON written and
the summary printed. Every row catches Exception and records its traceback; after a CUDA error the context is
probed with torch.cuda.synchronize() and, if it is broken, the remaining GPU rows are skipped. The JSON ($OUT/
gpu-check.json when $OUT is set, else --out) is rewritten atomically after every row. Each row records its
wall seconds, peak GPU memory and Inductor's cudagraph skips; compiled graphs are dropped after every row that
compiled. The summary, printed last, stays under 12,000 characters.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

STARTED = time.monotonic()  # the deadline counts from here, before torch's import (seconds on a cold machine)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFENSES = ("ttc", "scc-latency", "scc", "rtpt")
STEPS = ("env", "eager_b1", "kernels", "kernel_tests", "compiled_b1", "batch64", "scc_paper_compiled", "onnx",
         "onnx_cpu")
KERNEL_OPS = ("view_augment", "view_augment_adjoint", "sign_step")
KERNEL_TESTS = "tests/test_view_augment.py,tests/test_sign_step.py"
SUMMARY_LIMIT = 12_000
# torchvision VisionTransformer settings (the stand-in without open_clip): ViT-B/32 as in CLIP and a tiny one
VITS = {"b32": dict(image_size=224, patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, embed=512),
        "tiny": dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256, embed=32)}
MODELS = {"b32": "ViT-B-32", "tiny": "scc-tiny-digits"}

# Estimated seconds per row: (ViT-B/32 on one H100, the tiny model on a 2-core CPU). The CPU column is measured;
# the GPU column is scaled from CPU measurements and has not been checked on a GPU yet. An eager row runs 2 FLOP-
# counting calls, the reference, 1 warm-up and --calls timed calls; a compiled row adds the cold compile
# (ViT-B/32 on 2 CPU cores: TTC 74 s) and the CUDA-graph capture with its own timed calls.
ESTIMATES = {
    "env": (4, 1), "limits": (8, 1), "model": (12, 1),
    ("eager", "ttc"): (3, 1), ("eager", "scc-latency"): (5, 1), ("eager", "scc"): (8, 1), ("eager", "rtpt"): (15, 1),
    ("eager64", "ttc"): (8, 2), ("eager64", "scc-latency"): (12, 3),
    ("compiled", "ttc"): (70, 25), ("compiled", "scc-latency"): (110, 30), ("compiled", "scc"): (240, 50),
    ("compiled64", "ttc"): (80, 30), ("compiled64", "scc-latency"): (120, 40),
    "kernel": (8, 0), "kernel_tests": (120, 35), "onnx_cuda": (90, 0), "onnx_cpu": (100, 12),
}


class Skip(Exception):
    """A row that cannot run here (not an error): its reason is recorded."""


class Row(NamedTuple):  # (not a dataclass: tests load this file without registering it as a module)
    step: str
    name: str
    estimate_s: float
    run: Callable[["Check"], dict]
    gpu: bool = True  # uses this process's CUDA context (skipped once it is broken)
    compiles: bool = False  # drop the compiled graphs after it


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
def random_vit_classifier(vit: str = "b32", device: str = "cpu", seed: int = 0):
    """A ZeroShotClassifier over a random-weight torchvision ViT (no open_clip) and 47 random DTD text rows."""
    from torchvision.models.vision_transformer import VisionTransformer

    from scc.data import DTD_CLASSES
    from scc.models import ZeroShotClassifier

    cfg = dict(VITS[vit])
    embed = cfg.pop("embed")
    torch.manual_seed(seed)
    visual = VisionTransformer(**cfg, num_classes=embed)  # its head maps the class token to the embedding
    torch.nn.init.normal_(visual.heads.head.weight, std=cfg["hidden_dim"] ** -0.5)  # torchvision zero-inits it
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(len(DTD_CLASSES), embed, generator=gen)
    clf = ZeroShotClassifier(visual, text, logit_scale=100.0, image_size=cfg["image_size"], labels=list(DTD_CLASSES),
                             name=f"random-torchvision-vit-{vit}")
    return clf.to(device)


def build_classifier(vit: str, device: str):
    """(classifier, description): open_clip's model with random weights (DTD labels) or the bundled tiny model;
    the torchvision stand-in when open_clip cannot be imported."""
    import scc
    from scc.data import DTD_CLASSES, TEMPLATES

    try:
        import open_clip  # noqa: F401  (scc.load imports it; its absence is the one expected failure)
    except ImportError as err:
        return random_vit_classifier(vit, device), (f"torchvision ViT {vit}, random weights (open_clip missing: {err}; "
                                                    "R-TPT needs it: carry the wheels of benchmarks/gpu_wheels.sh)")
    if vit == "tiny":
        return scc.load(MODELS[vit], device=device), f"{MODELS[vit]} (bundled weights, its 10 labels)"
    clf = scc.load(MODELS[vit], None, labels=list(DTD_CLASSES), templates=TEMPLATES["dtd"], device=device, seed=0)
    return clf, f"open_clip {MODELS[vit]}, random weights (seed 0), 47 DTD labels"


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------
def timing(fn, device, calls: int, batch: int) -> dict:
    """Per-image milliseconds of `calls` calls of fn() after one warm-up call (scc.timing)."""
    from scc.timing import summarize, time_calls, warm_up

    warmup_s = warm_up(fn, device, 1)
    stats = summarize(time_calls(fn, device, calls), per=batch)
    return {"ms_per_image": round(stats["median"] * 1e3, 4), "p20_ms_per_image": round(stats["p20"] * 1e3, 4),
            "p80_ms_per_image": round(stats["p80"] * 1e3, 4), "timed_calls": stats["calls"],
            "warmup_s": round(warmup_s, 3)}


def capture_cuda_graph(run: Callable[[], torch.Tensor], device) -> tuple[Callable[[], torch.Tensor], float]:
    """(replay, capture seconds): run() captured once in a torch.cuda.CUDAGraph; replay() re-runs it on the same
    input tensors and returns a copy of its output (the next replay overwrites the graph's own)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # capture needs the work warmed up off the default stream
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    start = time.perf_counter()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = run()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    def replay() -> torch.Tensor:
        graph.replay()
        return out.clone()

    return replay, seconds


def agreement(out: torch.Tensor, reference: torch.Tensor) -> dict:
    from scc.metrics import top1_agreement

    return {"top1_agreement": top1_agreement(out, reference), "reference": "eager fp32, same draws",
            "max_abs_logit_diff": (out.float() - reference).abs().max().item()}


def run_row(clf, images, defense: str, backend: str, dtype: str, batch: int, mode: str | None, device: str,
            calls: int, reference: dict, limits: dict | None = None, cuda_graph: bool = False) -> dict:
    """One latency row through scc.backends.make_runner and scc.timing; `reference` caches eager fp32 logits and
    the counted FLOPs / encoder rounds per (defense, batch) for the agreement and roofline columns; `limits`
    holds the measured matmul peaks per dtype and the memory bandwidth (scc.bench.latency.machine_limits).
    cuda_graph: also capture the built runner in a CUDA graph and time its replays (CUDA only)."""
    import scc
    from scc.backends import make_runner
    from scc.bench.roofline import flops_per_image, roofline, weight_bytes
    from scc.passes import count_passes

    x = images[:batch]
    defended = scc.defend(clf, defense, seed=0)
    draws = defended.draws(x)
    key = (defense, batch)
    if key not in reference:
        with torch.no_grad():
            reference[key] = defended(x, draws).float()
        with count_passes(clf, batch) as counter:  # one eager call counts FLOPs and encoder rounds
            reference[key, "flops", "fp32"] = flops_per_image(defended, x, draws)
        reference[key, "rounds"] = counter.image_rounds
    if (key, "flops", dtype) not in reference:  # who runs which FLOPs at this dtype (the mix sets the row's peak)
        reference[key, "flops", dtype] = flops_per_image(defended, x, draws, DTYPES[dtype])
    runner = make_runner(defended, backend, batch, dtype=DTYPES[dtype], mode=mode if backend != "eager" else None)
    row = {"defense": defense, "backend": backend, "dtype": dtype, "batch": batch,
           "mode": mode if backend != "eager" else None, "compile_s": round(runner.compile_seconds or 0.0, 2),
           **({"kernels": runner.details["kernels"]} if "kernels" in runner.details else {})}
    run = lambda: runner(x, draws)  # noqa: E731
    row.update(timing(run, device, calls, batch))
    with torch.no_grad():
        row.update(agreement(run(), reference[key]))
    limits = limits or {}
    row.update(roofline(reference[key, "flops", dtype], row["ms_per_image"] / 1e3, limits.get("matmul_peak_gflops", {})))
    if limits.get("memory_gbps") and batch == 1:  # each sequential encoder round streams every weight once
        bound = reference[key, "rounds"] * weight_bytes(clf, DTYPES[dtype]) / (limits["memory_gbps"] * 1e9)
        row.update(encoder_rounds=reference[key, "rounds"], weight_streaming_bound_ms=round(bound * 1e3, 4),
                   weight_streaming_fraction=bound / (row["ms_per_image"] / 1e3))
    if cuda_graph:
        if torch.device(device).type != "cuda":
            row["cuda_graph"] = {"captured": False, "reason": f"CUDA graphs need a CUDA device, this row ran on {device}"}
        else:
            try:
                replay, capture_s = capture_cuda_graph(run, device)
                graph = {"captured": True, "capture_s": round(capture_s, 3), **timing(replay, device, calls, batch)}
                graph.update(agreement(replay(), reference[key]))
            except Exception as err:  # a capture that fails leaves the plain numbers above standing
                graph = {"captured": False, "error": error_line(err), "traceback": traceback.format_exc()}
            row["cuda_graph"] = graph
    return row


def error_line(err: BaseException) -> str:
    """`Type: the first line of the message` (at most 300 characters of it)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


# ----------------------------------------------------------------------------------------------------------
# Rows of each step
# ----------------------------------------------------------------------------------------------------------
def row_env(check: "Check") -> dict:
    from scc.provenance import hardware, versions

    env = {**versions(), **hardware(check.args.device), "cuda": torch.version.cuda,
           "triton_interpret": os.environ.get("TRITON_INTERPRET"), "ort_providers": ort_providers()}
    if check.device.type == "cuda":
        env.update(capability=".".join(map(str, torch.cuda.get_device_capability(check.device))),
                   cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(check.device).total_memory / 2**30, 1))
    check.report["env"] = env
    return {}


def row_limits(check: "Check") -> dict:
    from scc.bench.latency import machine_limits

    limits = machine_limits(check.usable_dtypes(), check.args.device, 1.0 if check.device.type == "cuda" else 0.3)
    check.limits = check.report["limits"] = limits
    return {}


def row_model(check: "Check") -> dict:
    check.model()
    return {"model": check.report["model"]}


def model_row(backend: str, defense: str, dtype: str, batch: int, check: "Check") -> dict:
    from scc.errors import SccError
    from scc.precision import check_dtype_on_device

    try:
        check_dtype_on_device(DTYPES[dtype], check.args.device)
    except SccError as err:
        raise Skip(str(err)) from None
    clf, images = check.model()
    if defense == "rtpt" and getattr(clf, "clip", None) is None:
        raise Skip("R-TPT tunes the text prompt and needs open_clip's text tower: carry the wheels of "
                   "benchmarks/gpu_wheels.sh")
    return run_row(clf, images, defense, backend, dtype, batch, None, check.args.device, check.args.calls,
                   check.reference, check.limits, cuda_graph=backend != "eager")


def kernel_row(op: str, batch: int, check: "Check") -> dict:
    """One hand kernel vs its torch reference, eager and Inductor-compiled (the honest baseline: Inductor fuses the
    same pointwise chains), 224x224, 4 views, fp32; do_bench medians in ms."""
    if check.device.type != "cuda":
        raise Skip(f"times CUDA kernels; this run is on {check.device}")
    from triton.testing import do_bench

    from scc.kernels import sign_step as ss
    from scc.kernels import view_augment as va

    flips, noisy, sigma = [False, True, False, True], [False, False, True, True], 0.01
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device="cuda")
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device="cuda")
    x = torch.rand(batch, 3, 224, 224, device="cuda")
    if op == "view_augment":
        noise = torch.randn(batch, 4, 3, 224, 224, device="cuda")
        kernel = lambda: va.view_augment(x, flips, noisy, noise, sigma, mean, std)  # noqa: E731
        ref = lambda: va.view_augment_ref(x, flips, noisy, noise, sigma, mean, std)  # noqa: E731
        nbytes = (1 + 2 + 4) * x.numel() * 4  # read z and 2 noisy views' noise; write 4 views
    elif op == "view_augment_adjoint":
        noise = torch.randn(batch, 4, 3, 224, 224, device="cuda")
        gv = torch.randn(batch * 4, 3, 224, 224, device="cuda")
        kernel = lambda: va.view_augment_adjoint_op(gv, x, noise, std, flips, noisy, sigma)  # noqa: E731
        ref = lambda: va.view_augment_adjoint_ref(gv, x, flips, noisy, noise, sigma, mean, std)  # noqa: E731
        nbytes = (4 + 1 + 2 + 1) * x.numel() * 4
    else:
        d = (torch.rand_like(x) * 2 - 1) * 4 / 255
        g = torch.randn_like(x)
        kernel = lambda: ss.sign_step(d, g, x, 1 / 255, 4 / 255)  # noqa: E731
        ref = lambda: ss.sign_step_ref(d, g, x, 1 / 255, 4 / 255)  # noqa: E731
        nbytes = 4 * x.numel() * 4
    compiled = torch.compile(ref, fullgraph=True, dynamic=False)
    a, b = kernel(), compiled()
    row = {"op": op, "batch": batch, "bytes": nbytes,
           "kernel_ms": do_bench(kernel, return_mode="median"), "eager_ref_ms": do_bench(ref, return_mode="median"),
           "inductor_ref_ms": do_bench(compiled, return_mode="median"),
           "max_abs_diff_vs_inductor": (a.float() - b.float()).abs().max().item()}
    row["kernel_GBps"] = round(nbytes / row["kernel_ms"] / 1e6, 1)
    return row


def row_kernel_tests(check: "Check") -> dict:
    """pytest on the kernel tests in a subprocess (its own CUDA context), with a timeout inside the deadline."""
    nodes = [n for n in check.args.kernel_tests.split(",") if n]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *nodes]
    env = dict(os.environ)
    if check.device.type == "cuda":
        if importlib.util.find_spec("xdist"):
            cmd += ["-n", "4"]
    else:
        env["TRITON_INTERPRET"] = "1"  # CPU tensors run the kernels under triton's interpreter
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "120"]
    limit = max(5.0, min(check.args.tests_timeout_s, check.remaining() - check.args.reserve_s))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    check.child = proc
    try:
        output, _ = proc.communicate(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        timed_out = True
    finally:
        check.child = None
    lines = output.strip().splitlines()
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                                      lines[-1] if lines else "")}
    row = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "counts": counts, "tail": lines[-30:],
           "timeout_s": round(limit)}
    if timed_out:
        row.update(status="error", error=f"the kernel tests did not finish within {limit:.0f} s (killed); "
                                         "run them alone with a longer --tests-timeout-s")
    elif proc.returncode != 0:
        row.update(status="error", error=f"pytest exited {proc.returncode}: {lines[-1] if lines else 'no output'}")
    check.report["kernel_tests"] = row
    return row


def onnx_cuda_reason() -> str | None:
    """None when ORT can run on the GPU here, else why the onnx step is skipped."""
    providers = ort_providers()
    if isinstance(providers, str):
        return providers
    if "CUDAExecutionProvider" not in providers:
        return (f"onnxruntime has no CUDAExecutionProvider (providers {providers}): the GPU build, onnxruntime-gpu, "
                "is too large to carry to the GPU machine")
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def ort_providers() -> list[str] | str:
    try:
        import onnxruntime
    except ImportError as err:
        return f"onnxruntime cannot be imported ({err})"
    return onnxruntime.get_available_providers()


def onnx_cuda_row(defense: str, dtype: str, check: "Check") -> dict:
    """TTC / SCC-latency exported at batch 1 with draws as inputs, on ORT's CUDA provider, IOBinding vs CUDA graph."""
    import tempfile

    import scc
    from scc.export import export_onnx
    from scc.export.runtime import benchmark_cuda_graph

    clf, _ = check.model()
    cpu_clf = copy.deepcopy(clf).to("cpu")  # traced on the CPU: the weights become the file's constants
    path = Path(tempfile.mkdtemp(prefix="scc-gpu-onnx-")) / f"{defense}-{dtype}.onnx"
    info = export_onnx(scc.defend(cpu_clf, defense, seed=0), path, batch_size=1, draws_as_inputs=True,
                       dtype=DTYPES[dtype])
    return {"defense": defense, "dtype": dtype, "batch": 1, "export_s": round(info["seconds"], 1),
            **benchmark_cuda_graph(path)}


def onnx_cpu_row(defense: str, check: "Check") -> dict:
    """ORT on the CPU cores (torch's thread count), fp32 batch 1, against eager fp32 on the CPU, same draws."""
    import scc
    from scc.backends import make_runner

    clf, images = check.model()
    cpu_clf = copy.deepcopy(clf).to("cpu") if check.device.type != "cpu" else clf
    x = images[:1].cpu()
    defended = scc.defend(cpu_clf, defense, seed=0)
    draws = defended.draws(x)
    with torch.no_grad():
        reference = defended(x, draws).float()
    runner = make_runner(defended, "onnx", 1)
    run = lambda: runner(x, draws)  # noqa: E731
    row = {"defense": defense, "backend": "onnx-cpu", "dtype": "fp32", "batch": 1,
           "compile_s": round(runner.compile_seconds or 0.0, 2), "threads": torch.get_num_threads(),
           **timing(run, "cpu", check.args.calls, 1)}
    row.update(agreement(run(), reference))
    return row


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------
def plan(args) -> list[Row]:
    """Every row of the selected steps, in run order, with its estimated seconds."""
    col = 1 if args.vit == "tiny" else 0
    est = lambda key: ESTIMATES[key][col]  # noqa: E731
    defenses = [d for d in DEFENSES if d in args.defenses]
    dtypes = [d for d in DTYPES if d in args.dtypes]
    big = args.batch
    rows = [Row("env", "env", est("env"), row_env, gpu=False), Row("env", "limits", est("limits"), row_limits),
            Row("env", "model", est("model"), row_model)]
    rows += [Row("eager_b1", f"eager {d} {t} b1", est(("eager", d)), partial(model_row, "eager", d, t, 1))
             for t in dtypes for d in defenses]
    rows += [Row("kernels", f"kernel {op} b{b}", est("kernel"), partial(kernel_row, op, b), compiles=True)
             for b in (1, big) for op in KERNEL_OPS]
    rows.append(Row("kernel_tests", "kernel tests", min(est("kernel_tests"), args.tests_timeout_s), row_kernel_tests,
                    gpu=False))
    compiled = lambda step, d, t, b, key: Row(step, f"compiled {d} {t} b{b}", est((key, d)),  # noqa: E731
                                              partial(model_row, "compiled", d, t, b), compiles=True)
    rows += [compiled("compiled_b1", d, t, 1, "compiled") for t in ("bf16", "fp32") for d in ("ttc", "scc-latency")
             if d in defenses and t in dtypes]
    rows += [Row("batch64", f"eager {d} {t} b{big}", est(("eager64", d)), partial(model_row, "eager", d, t, big))
             for t in ("bf16", "fp32") for d in ("ttc", "scc-latency") if d in defenses and t in dtypes]
    rows += [compiled("batch64", d, "bf16", big, "compiled64") for d in ("ttc", "scc-latency")
             if d in defenses and "bf16" in dtypes]
    rows += [compiled("scc_paper_compiled", "scc", t, 1, "compiled") for t in ("bf16", "fp32")
             if "scc" in defenses and t in dtypes]
    why_not = onnx_cuda_reason()
    if why_not:
        rows.append(Row("onnx", "onnx", 0, partial(skip_row, why_not), gpu=False))
    else:
        rows += [Row("onnx", f"onnx-cuda {d} {t} b1", est("onnx_cuda"), partial(onnx_cuda_row, d, t))
                 for d in ("ttc", "scc-latency") for t in ("fp32", "fp16") if d in defenses]
    if "ttc" in defenses and "fp32" in dtypes:
        rows.append(Row("onnx_cpu", "onnx-cpu ttc fp32 b1", est("onnx_cpu"), partial(onnx_cpu_row, "ttc"), gpu=False))
    for step in STEPS:  # a selected step keeps one row in the report even when the filters leave it none
        if not any(r.step == step for r in rows):
            rows.append(Row(step, step, 0, partial(skip_row, "--defenses / --dtypes select no row of this step"),
                            gpu=False))
    return sorted((r for r in rows if r.step in args.steps), key=lambda r: STEPS.index(r.step))


def skip_row(reason: str, check: "Check") -> dict:
    raise Skip(reason)


def plan_table(rows: list[Row], deadline_s: float, header: str) -> str:
    """The plan with each row's estimate, the running total of the rows that fit, and what the budget drops
    (a row that does not fit is skipped and the next, cheaper one may still fit: as in a real run)."""
    lines = [header, f"{'#':>3}  {'step':<19} {'row':<32} {'est s':>6} {'total s':>8}  within {deadline_s:.0f} s",
             "-" * 86]
    total, fit, dropped = 0.0, 0, []
    for i, r in enumerate(rows, 1):
        ok = total + r.estimate_s <= deadline_s
        total += r.estimate_s if ok else 0
        fit += ok
        if not ok:
            dropped.append(r.name)
        lines.append(f"{i:>3}  {r.step:<19} {r.name:<32} {r.estimate_s:>6.0f} {total if ok else '':>8}  "
                     f"{'yes' if ok else 'no: skipped'}")
    lines += ["-" * 86, f"{fit} of {len(rows)} rows fit in {deadline_s:.0f} s (estimated {total:.0f} s); "
              f"all rows: {sum(r.estimate_s for r in rows):.0f} s",
              "skipped by the budget: " + (", ".join(dropped) if dropped else "none")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------
class Check:
    """Runs the plan's rows under the deadline; owns the report, its JSON file and the shared model."""

    def __init__(self, args, rows: list[Row], out: Path, start: float | None = None):
        self.args, self.rows, self.out = args, rows, out
        self.device = torch.device(args.device)
        self.start = time.monotonic() if start is None else start  # time.monotonic() the deadline counts from
        self.lock = threading.RLock()
        self.reference: dict = {}
        self.limits: dict = {}
        self.cuda_broken: str | None = None
        self.child: subprocess.Popen | None = None
        self.current: dict | None = None
        self._model = None
        self.report: dict = {
            "check": "benchmarks/gpu_check.py", "argv": args.argv, "deadline_s": args.deadline_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished": False,
            "plan": [{"step": r.step, "row": r.name, "estimate_s": r.estimate_s} for r in rows],
            "steps": {s: {"status": "not selected"} for s in STEPS},
            "rows": []}
        for s in dict.fromkeys(r.step for r in rows):
            self.report["steps"][s] = {"status": "pending"}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.args.deadline_s - self.elapsed()

    def usable_dtypes(self) -> list[torch.dtype]:
        from scc.errors import SccError
        from scc.precision import check_dtype_on_device

        usable = []
        for name in self.args.dtypes:
            try:
                check_dtype_on_device(DTYPES[name], self.device)
                usable.append(DTYPES[name])
            except SccError:
                continue
        return usable

    def model(self):
        """(classifier, images) built on first use; a failed build is raised again for every later row."""
        if self._model is None:
            try:
                clf, what = build_classifier(self.args.vit, self.args.device)
                gen = torch.Generator().manual_seed(0)
                images = torch.rand(self.args.batch, 3, clf.image_size, clf.image_size, generator=gen)
                self._model = (clf, images.to(self.device))
                self.report["model"] = {"name": clf.name, "what": what, "image_size": clf.image_size,
                                        "classes": clf.num_classes, "pixels": "uniform random (seed 0)"}
            except Exception as err:
                self._model = RuntimeError(f"building the model failed: {error_line(err)}")
                raise
        if isinstance(self._model, Exception):
            raise self._model
        return self._model

    def write(self) -> None:
        with self.lock:
            self.report["elapsed_s"] = round(self.elapsed(), 1)
            text = json.dumps(self.report, indent=1, default=str)
            tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out)

    def add(self, rec: dict) -> None:
        with self.lock:
            self.report["rows"].append(rec)
            step = self.report["steps"][rec["step"]]
            statuses = [r["status"] for r in self.report["rows"] if r["step"] == rec["step"]]
            step["status"] = ("ok" if all(s == "ok" for s in statuses) else
                              "skipped" if all(s == "skipped" for s in statuses) else "partial")
            step["rows"] = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
            self.write()
        print(row_line(rec, self.elapsed()), flush=True)

    def run(self) -> None:
        self.write()
        watchdog = threading.Timer(max(self.remaining(), 0.0), self.expire)
        watchdog.daemon = True
        watchdog.start()
        fail_at = {n for n in self.args.fail_at.split(",") if n}
        for row in self.rows:
            rec = {"step": row.step, "row": row.name, "estimate_s": row.estimate_s}
            if row.gpu and self.cuda_broken:
                rec.update(status="skipped", reason=f"the CUDA context is broken since {self.cuda_broken}")
            elif row.estimate_s > self.remaining() - self.args.reserve_s:
                rec.update(status="skipped", reason=f"deadline: {max(self.remaining(), 0):.0f} s left, this row "
                                                    f"needs ~{row.estimate_s:.0f} s")
            else:
                self.run_one(row, rec, fail_at)
            self.add(rec)
        watchdog.cancel()
        with self.lock:
            self.report["finished"] = True
            self.report["elapsed_s"] = round(self.elapsed(), 1)
            self.report["summary"] = summary(self.report)
            self.write()

    def run_one(self, row: Row, rec: dict, fail_at: set[str]) -> None:
        from torch._dynamo.utils import counters

        cuda = self.device.type == "cuda" and not self.cuda_broken
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        skips = counters["inductor"]["cudagraph_skips"]
        start = time.monotonic()
        self.current = rec
        try:
            if row.name in fail_at or row.step in fail_at:
                raise RuntimeError(f"planted failure in {row.name!r} (--fail-at)")
            result = row.run(self)
            rec.update(result)
            rec.setdefault("status", "ok")
            if cuda and rec.get("cuda_graph", {}).get("error"):  # did the failed capture break the context?
                self.probe_cuda(rec)
        except Skip as why:
            rec.update(status="skipped", reason=str(why))
        except Exception as err:  # any failure of one row: record it, go on with the next
            rec.update(status="error", error=error_line(err), traceback=traceback.format_exc())
            if cuda:
                self.probe_cuda(rec)
        finally:
            self.current = None
            rec["seconds"] = round(time.monotonic() - start, 2)
            rec["inductor_cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
            if cuda and not self.cuda_broken:
                rec["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            if row.compiles and rec["status"] != "skipped":
                self.release(rec)

    def probe_cuda(self, rec: dict) -> None:
        """After an error on CUDA: is the context still usable? If not, the GPU rows that follow are skipped."""
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            rec["cuda_context"] = "ok"
        except Exception as err:  # a sticky CUDA error: nothing more can run in this process
            self.cuda_broken = f"{rec['row']} ({error_line(err)})"
            rec["cuda_context"] = f"broken: {error_line(err)}"

    def release(self, rec: dict) -> None:
        """Drop every compiled graph (and the memory they hold) before the next row compiles its own."""
        from scc.backends.compiled import drop_compiled_graphs

        try:
            drop_compiled_graphs()
            if self.device.type == "cuda" and not self.cuda_broken:
                torch.cuda.empty_cache()
        except Exception as err:
            rec["release_error"] = error_line(err)

    def expire(self) -> None:
        """The deadline: cut the row in progress, write the JSON, print the summary and end the process."""
        if not self.lock.acquire(timeout=20):
            print("deadline: the report stayed locked; the JSON holds the rows finished so far", flush=True)
            os._exit(3)
        try:
            if self.child is not None:
                self.child.kill()
            rec = self.current
            if rec is not None:
                rec.update(status="error", error=f"cut by the deadline ({self.args.deadline_s:.0f} s)")
                self.report["rows"].append(rec)
                self.report["steps"][rec["step"]]["status"] = "partial"
            self.report["deadline_hit"] = True
            self.report["elapsed_s"] = round(self.elapsed(), 1)
            self.report["summary"] = summary(self.report)
            self.write()
            print(self.report["summary"], flush=True)
        finally:
            os._exit(3)


def row_line(rec: dict, elapsed: float) -> str:
    """One printed line per row (the JSON holds everything)."""
    what = ""
    if rec["status"] == "ok" and "ms_per_image" in rec:
        what = f"{rec['ms_per_image']:.3f} ms/image"
        if rec.get("compile_s"):
            what += f", compile {rec['compile_s']:.1f} s"
        graph = rec.get("cuda_graph")
        if graph and graph.get("captured"):
            what += f", CUDA graph {graph['ms_per_image']:.3f} ms/image"
    elif rec["status"] == "ok" and "kernel_ms" in rec:
        what = f"kernel {rec['kernel_ms']:.4f} ms, inductor {rec['inductor_ref_ms']:.4f} ms"
    elif rec["status"] != "ok":
        what = rec.get("error") or rec.get("reason", "")
    return f"[{elapsed:6.1f} s] {rec['step']}/{rec['row']}: {rec['status']}" + (f" ({rec.get('seconds', 0):.1f} s)"
                                                                                if "seconds" in rec else "") + \
        (f": {what}" if what else "")


# ----------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------
def summary(report: dict) -> str:
    """The table printed last: per defense, backend and dtype the ms/image, top-1 agreement with eager fp32,
    compile seconds and CUDA graph capture, with SCC's Table 4 beside it; then kernels, tests, steps, errors."""
    from scc.bench.latency import PAPER

    env, model = report.get("env", {}), report.get("model", {})
    where = env.get("gpu") or f"{env.get('cpu', '?')} ({env.get('torch_threads', '?')} threads)"
    lines = [f"== gpu_check summary: {model.get('name', '?')} on {where}; torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}; {report.get('elapsed_s', 0):.0f} s of {report['deadline_s']:.0f} s"
             + ("" if report.get("finished") else " (cut by the deadline)")]
    head = (f"{'defense':<12}{'backend':<16}{'dtype':<6}{'batch':>5}{'ms/image':>10}{'top1':>6}{'compile s':>10}"
            f"{'peak MiB':>10}  | {'Table 4 ms/image':>16}")
    models = [r for r in report["rows"] if r.get("status") == "ok" and "ms_per_image" in r and "defense" in r]
    for batch_is_one in (True, False):
        chosen = [r for r in models if (r["batch"] == 1) == batch_is_one]
        if not chosen:
            continue
        lines += ["", ("batch 1" if batch_is_one else "larger batches") + " (top1 = agreement with eager fp32 on "
                  "the same draws; random weights: not an accuracy)", head, "-" * len(head)]
        for r in chosen:
            paper = PAPER.get(r["defense"])
            beside = f"{paper[0] * 1e3:>10.1f} ({r['ms_per_image'] / (paper[0] * 1e3):.2f}x)" if paper else ""
            peak = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") is not None else "-"
            compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") else "-"
            lines.append(f"{r['defense']:<12}{r['backend']:<16}{r['dtype']:<6}{r['batch']:>5}{r['ms_per_image']:>10.3f}"
                         f"{r['top1_agreement']:>6.2f}{compile_s:>10}{peak:>10}  | {beside}")
            graph = r.get("cuda_graph")
            if graph is not None:
                if graph.get("captured"):
                    lines.append(f"{'':<12}{'+ CUDA graph':<16}{r['dtype']:<6}{r['batch']:>5}"
                                 f"{graph['ms_per_image']:>10.3f}{graph['top1_agreement']:>6.2f}"
                                 f"{'captured':>10} (capture {graph['capture_s']:.2f} s; Inductor cudagraph skips "
                                 f"{r.get('inductor_cudagraph_skips', 0)})")
                else:
                    why = graph.get("error") or graph.get("reason", "")
                    lines.append(f"{'':<12}{'+ CUDA graph':<16}not captured: {why[:120]}")
    lines.append("Table 4 = SCC project page (DTD; hardware not stated): R-TPT 0.37 s, TTC 0.012 s, SCC 0.0125 s per "
                 "image; (x) = ours / paper")
    kernels = [r for r in report["rows"] if r.get("status") == "ok" and "kernel_ms" in r]
    if kernels:
        lines += ["", f"{'kernel':<22}{'batch':>6}{'kernel ms':>11}{'eager ms':>10}{'inductor ms':>12}{'GB/s':>8}"]
        lines += [f"{r['op']:<22}{r['batch']:>6}{r['kernel_ms']:>11.4f}{r['eager_ref_ms']:>10.4f}"
                  f"{r['inductor_ref_ms']:>12.4f}{r['kernel_GBps']:>8.0f}" for r in kernels]
    ort = [r for r in report["rows"] if r.get("status") == "ok" and "iobinding_ms_per_image" in r]
    if ort:
        lines += [""] + [f"onnx-cuda {r['defense']} {r['dtype']} b1: IOBinding {r['iobinding_ms_per_image']:.3f} "
                         f"ms/image, CUDA graph {r['cuda_graph_ms_per_image']:.3f} ms/image (top1 "
                         f"{r['top1_agreement']:.2f} between them), export {r['export_s']:.0f} s" for r in ort]
    tests = report.get("kernel_tests")
    if tests:
        lines += ["", f"kernel tests: exit {tests['returncode']}, {tests['counts'] or tests['tail'][-1:]}"]
    lines += ["", "steps: " + ", ".join(f"{k} {v['status']}" + (f" {v['rows']}" if v.get("rows") else "")
                                        for k, v in report["steps"].items() if v["status"] != "not selected")]
    errors = [r for r in report["rows"] if r["status"] == "error"]
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    body = "\n".join(lines)
    tail = []
    for r in errors:
        tail.append(f"error  {r['row']}: {r.get('error', '')[:200]}")
    reasons: dict[str, list[str]] = {}
    for r in skipped:
        reasons.setdefault(re.sub(r"\d+ s left.*", "time left", r["reason"])[:240], []).append(r["row"])
    tail += [f"skipped ({len(names)}) {', '.join(names)[:300]}: {why}" for why, names in reasons.items()]
    tail.append(f"JSON: {report.get('json', '?')}")
    text = body + "\n" + "\n".join(tail)
    if len(text) > SUMMARY_LIMIT:  # the last 12,000 characters of a device call's output come back
        text = text[: SUMMARY_LIMIT - 80] + "\n... (summary cut to fit 12,000 characters; the JSON has every row)"
    return text


# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the rows with their estimated seconds; run nothing")
    p.add_argument("--deadline-s", type=float, default=540.0,
                   help="seconds from the start to the end of the last row (default 540: a 600 s call with room "
                        "for the install)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vit", default="b32", choices=sorted(VITS),
                   help="b32: CLIP ViT-B/32 (random weights); tiny: the bundled scc-tiny-digits")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--batch", type=int, default=64, help="the batch64 step's images per call")
    p.add_argument("--calls", type=int, default=10, help="timed calls per row (median reported)")
    p.add_argument("--kernel-tests", default=KERNEL_TESTS, help="pytest paths/node ids of the kernel_tests step")
    p.add_argument("--tests-timeout-s", type=float, default=240.0, help="the kernel tests' subprocess timeout")
    p.add_argument("--reserve-s", type=float, default=5.0, help="seconds kept free for the summary")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu-check.json if $OUT is set, else "
                                                "benchmarks/results/gpu-check.json)")
    p.add_argument("--fail-at", default="", help=argparse.SUPPRESS)  # test hook: these rows/steps raise
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for name, allowed in (("steps", STEPS), ("defenses", DEFENSES), ("dtypes", tuple(DTYPES))):
        values = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {','.join(allowed)}")
        setattr(args, name, values)
    if args.batch < 1 or args.calls < 1 or args.deadline_s <= 0:
        p.error(f"--batch ({args.batch}), --calls ({args.calls}) and --deadline-s ({args.deadline_s}) must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = plan(args)
    if args.plan:
        where = ("one H100, scaled from CPU measurements (no GPU run has measured them yet)" if args.vit == "b32"
                 else "a 2-core CPU (measured)")
        print(plan_table(rows, args.deadline_s, f"gpu_check plan: {MODELS[args.vit]}; estimated seconds for {where}"))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --device cpu --vit tiny for a smoke run", file=sys.stderr)
        return 2
    if importlib.util.find_spec("scc") is None:
        print("cannot import scc: install it first (`python3 -m pip install --no-deps --no-build-isolation "
              "--no-index --target DIR .` and put DIR on PYTHONPATH; benchmarks/gpu_wheels.sh prints the command)",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu-check.json" if os.environ.get("OUT")
                                           else RESULTS / "gpu-check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    check = Check(args, rows, out, start=STARTED)
    check.report["json"] = str(out)
    check.run()
    print(check.report["summary"], flush=True)
    return 1 if any(r["status"] == "error" for r in check.report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())

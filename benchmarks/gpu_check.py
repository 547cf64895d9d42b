"""GPU check on a lent H100/H200: kernel tests on device, kernel micro-benchmarks, CUDA-graph latency table.

Works where the device image has torch >= 2.11 and triton >= 3.6 but neither network nor open_clip: the model
is a random-weight CLIP ViT-B/32 image tower built from torchvision (`random_vit_classifier`) with random unit
text embeddings for the 47 DTD classes, so latencies are real and answers are compared between backends only.

    python3 -m pip install -q --no-deps --no-build-isolation -e .     # once per fresh machine (offline)
    python3 benchmarks/gpu_check.py --steps env,tests,kernels                        # a few minutes
    python3 benchmarks/gpu_check.py --steps models --defenses ttc,scc-latency        # each compiled row compiles
                                                   # its own ViT-B/32 graph (~1-3 min on CPU here; split the runs
                                                   # to fit a 10-minute call, the JSON keeps every finished row)
    python3 benchmarks/gpu_check.py --steps models --defenses scc --out benchmarks/results/gpu-check-scc.json

Steps (--steps, comma-separated):
  env      torch / triton / GPU names.
  tests    pytest tests/test_view_augment.py tests/test_sign_step.py on the GPU (fp32 and bf16).
  kernels  each hand kernel vs its torch reference run eagerly and compiled by Inductor (the honest baseline:
           Inductor fuses the same pointwise chains), 224x224, L=4 views, batch 1 and 64, fp32.
  models   per-image latency of eager / compiled / triton at batch 1 and 64, fp32, bf16 and fp16; compiled and
           triton run under --mode (default reduce-overhead: CUDA graphs captured at warm-up), and each row
           reports its compile seconds, its top-1 agreement with eager fp32 on the same draws, and its roofline
           columns (scc.bench.roofline): counted GFLOP per image, achieved GFLOP/s, the fraction of the GPU's measured
           matmul peak for its dtype, and at batch 1 the weight-streaming bound (rounds x weight bytes /
           measured bandwidth) and the fraction of the latency it explains.
  onnx     ORT on the GPU: TTC and SCC-latency exported at a fixed batch (1, draws as inputs) in fp32 and fp16
           (`scc export onnx --dtype fp16`), each timed with plain IOBinding vs CUDA graph capture
           (scc.export.runtime.benchmark_cuda_graph, same pixels and draws; logits diff and top-1 agreement).
           Needs onnx, onnxscript and onnxruntime-gpu; a missing one is recorded as the row's "skipped" reason.
Results go to one JSON file (rewritten after every row, so a run cut short still leaves what it measured).
Everything device-independent here (the classifier builder, the row runner) also runs on CPU:
`python benchmarks/gpu_check.py --device cpu --vit tiny --steps models --batch-sizes 2 --dtypes fp32`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torchvision VisionTransformer settings: ViT-B/32 as in CLIP (width 768, 12 layers, 12 heads, embed 512), and
# a tiny one for CPU smoke runs
VITS = {"b32": dict(image_size=224, patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, embed=512),
        "tiny": dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256, embed=32)}


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


# ----------------------------------------------------------------------------------------------------------
def step_env(report: dict, device: str) -> None:
    from scc.provenance import hardware, versions

    env = {**versions(), **hardware(device), "cuda": torch.version.cuda}
    report["env"] = env
    print(json.dumps(env), flush=True)


def step_tests(report: dict) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_view_augment.py",
           "tests/test_sign_step.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
    report["tests"] = {"returncode": proc.returncode, "tail": tail}
    print("\n".join(tail), flush=True)


def step_kernels(report: dict, batch_sizes: list[int]) -> None:
    """Each hand kernel vs its reference, eager and Inductor-compiled; times from triton's do_bench (ms)."""
    from triton.testing import do_bench

    from scc.kernels import sign_step as ss
    from scc.kernels import view_augment as va

    flips, noisy, sigma = [False, True, False, True], [False, False, True, True], 0.01
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device="cuda")
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device="cuda")
    rows = []
    for B in batch_sizes:
        x = torch.rand(B, 3, 224, 224, device="cuda")
        d = (torch.rand_like(x) * 2 - 1) * 4 / 255
        g = torch.randn_like(x)
        noise = torch.randn(B, 4, 3, 224, 224, device="cuda")
        gv = torch.randn(B * 4, 3, 224, 224, device="cuda")
        cases = {
            "view_augment": (lambda: va.view_augment(x, flips, noisy, noise, sigma, mean, std),
                             lambda: va.view_augment_ref(x, flips, noisy, noise, sigma, mean, std),
                             (1 + 2 + 4) * x.numel() * 4),  # read z, 2 noisy views; write 4 views
            "view_augment_adjoint": (lambda: va.view_augment_adjoint_op(gv, x, noise, std, flips, noisy, sigma),
                                     lambda: va.view_augment_adjoint_ref(gv, x, flips, noisy, noise, sigma, mean, std),
                                     (4 + 1 + 2 + 1) * x.numel() * 4),
            "sign_step": (lambda: ss.sign_step(d, g, x, 1 / 255, 4 / 255),
                          lambda: ss.sign_step_ref(d, g, x, 1 / 255, 4 / 255), 4 * x.numel() * 4),
        }
        for name, (kernel, ref, nbytes) in cases.items():
            row = {"op": name, "batch": B, "bytes": nbytes}
            try:
                compiled = torch.compile(ref, fullgraph=True, dynamic=False)
                a, b = kernel(), compiled()
                a, b = (a, b) if isinstance(a, torch.Tensor) else (a[-1], b[-1])
                row.update(kernel_ms=do_bench(kernel), eager_ref_ms=do_bench(ref), inductor_ref_ms=do_bench(compiled),
                           max_abs_diff_vs_inductor=(a.float() - b.float()).abs().max().item())
                row["kernel_GBps"] = round(nbytes / row["kernel_ms"] / 1e6, 1)
            except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as err:  # record it, go on
                row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    report["kernels"] = rows


def run_row(clf, images, defense: str, backend: str, dtype: str, batch: int, mode: str | None, device: str,
            calls: int, reference: dict, limits: dict | None = None) -> dict:
    """One latency row through scc.backends.make_runner and scc.timing; `reference` caches eager fp32 logits and
    the counted FLOPs / encoder rounds per (defense, batch) for the agreement and roofline columns; `limits`
    holds the measured matmul peaks per dtype and the memory bandwidth (scc.bench.machine_limits)."""
    import scc
    from scc.backends import make_runner
    from scc.passes import count_passes
    from scc.bench.roofline import flops_per_image, roofline, weight_bytes
    from scc.timing import summarize, time_calls, warm_up

    x = images[:batch]
    defended = scc.defend(clf, defense, seed=0)
    draws = defended.draws(x)
    key = (defense, batch)
    if key not in reference:
        with torch.no_grad():
            reference[key] = defended(x, draws)
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
    row["warmup_s"] = round(warm_up(run, device, 1), 3)
    with torch.no_grad():
        out = run()
    stats = summarize(time_calls(run, device, calls), per=batch)
    row.update(ms_per_image=round(stats["median"] * 1e3, 4), p20_ms_per_image=round(stats["p20"] * 1e3, 4),
               p80_ms_per_image=round(stats["p80"] * 1e3, 4), timed_calls=stats["calls"],
               top1_agreement_vs_eager_fp32=(out.argmax(1) == reference[key].argmax(1)).float().mean().item(),
               max_abs_logit_diff=(out.float() - reference[key]).abs().max().item())
    limits = limits or {}
    row.update(roofline(reference[key, "flops", dtype], stats["median"], limits.get("matmul_peak_gflops", {})))
    if limits.get("memory_gbps") and batch == 1:  # each sequential encoder round streams every weight once
        bound = reference[key, "rounds"] * weight_bytes(clf, DTYPES[dtype]) / (limits["memory_gbps"] * 1e9)
        row.update(encoder_rounds=reference[key, "rounds"], weight_streaming_bound_ms=round(bound * 1e3, 4),
                   weight_streaming_fraction=bound / stats["median"])
    return row


def step_models(report: dict, args, write) -> None:
    from scc.bench.latency import machine_limits
    from scc.errors import SccError
    from scc.precision import check_dtype_on_device

    clf = random_vit_classifier(args.vit, args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    images = torch.rand(max(args.batch_sizes), 3, clf.image_size, clf.image_size, generator=gen, device=args.device)
    mode = None if args.mode == "none" else args.mode
    reference: dict = {}
    dtypes = []
    for name in args.dtypes:
        try:
            check_dtype_on_device(DTYPES[name], args.device)  # fp16 on a CPU without native fp16 matmuls
            dtypes.append(name)
        except SccError as err:
            print(f"skipping {name}: {err}", flush=True)
    limits = machine_limits([DTYPES[d] for d in dtypes], args.device)
    report["limits"] = limits
    print(json.dumps(limits), flush=True)
    args.dtypes = dtypes
    report.setdefault("models", [])
    for defense in args.defenses:
        for batch in args.batch_sizes:
            for dtype in args.dtypes:
                for backend in args.backends:
                    try:
                        row = run_row(clf, images, defense, backend, dtype, batch, mode, args.device, args.calls,
                                      reference, limits)
                    except (RuntimeError, torch._dynamo.exc.TorchDynamoException, SccError) as err:  # OOM, compile
                        row = {"defense": defense, "backend": backend, "dtype": dtype, "batch": batch,
                               "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
                    row["model"] = clf.name
                    report["models"].append(row)
                    print(json.dumps(row), flush=True)
                    write()


def step_onnx(report: dict, args, write) -> None:
    """ORT CUDA provider, IOBinding vs CUDA graph, fp32 and fp16 files of TTC and SCC-latency at batch 1."""
    import tempfile

    from scc.defenses import defend, split_label
    from scc.errors import SccError

    clf = random_vit_classifier(args.vit, "cpu")  # traced on the CPU: the weights become the file's constants
    report.setdefault("onnx", [])
    folder = Path(tempfile.mkdtemp(prefix="scc-gpu-onnx-"))
    for label in ("ttc", "scc-latency"):
        name, preset = split_label(label)
        for dtype in ("fp32", "fp16"):
            row = {"defense": label, "dtype": dtype, "batch": 1, "model": clf.name}
            try:
                from scc.export import export_onnx
                from scc.export.runtime import benchmark_cuda_graph

                path = folder / f"{label}-{dtype}.onnx"
                info = export_onnx(defend(clf, name, preset=preset, seed=0), path, batch_size=1,
                                   draws_as_inputs=True, dtype=DTYPES[dtype])
                row["export_seconds"] = round(info["seconds"], 1)
                row.update(benchmark_cuda_graph(path))
            except (ImportError, SccError, RuntimeError) as err:
                row["skipped"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            report["onnx"].append(row)
            print(json.dumps(row), flush=True)
            write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="env,tests,kernels,models,onnx")
    p.add_argument("--device", default="cuda")
    p.add_argument("--vit", default="b32", choices=sorted(VITS))
    p.add_argument("--defenses", default="ttc,scc-latency,scc")
    p.add_argument("--backends", default="eager,compiled,triton")
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--mode", default="reduce-overhead", help="compile mode of compiled/triton rows (none: plain)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per row (median reported)")
    p.add_argument("--out", default=str(RESULTS / "gpu-check.json"))
    args = p.parse_args(argv)
    args.defenses, args.backends = args.defenses.split(","), args.backends.split(",")
    args.dtypes, args.batch_sizes = args.dtypes.split(","), [int(b) for b in args.batch_sizes.split(",")]
    steps = args.steps.split(",")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --device cpu --vit tiny for a smoke run", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.mode in ("reduce-overhead", "max-autotune"):
        args.mode = "none"  # CUDA graphs need CUDA
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"argv": sys.argv[1:] if argv is None else argv}

    def write() -> None:
        out.write_text(json.dumps(report, indent=1))

    try:
        importlib.import_module("scc")
    except ImportError as err:
        print(f"cannot import scc ({err}): run `python3 -m pip install --no-deps --no-build-isolation -e .` "
              "in the repository first", file=sys.stderr)
        return 2
    if "env" in steps:
        step_env(report, args.device)
        write()
    if "tests" in steps:
        step_tests(report)
        write()
    if "kernels" in steps:
        if args.device != "cuda":
            print("kernels step skipped: it times CUDA kernels", flush=True)
        else:
            step_kernels(report, args.batch_sizes)
            write()
    if "models" in steps:
        step_models(report, args, write)
    if "onnx" in steps:
        step_onnx(report, args, write)
    write()
    print(f"wrote {out}")
    return 1 if report.get("tests", {}).get("returncode", 0) else 0


if __name__ == "__main__":
    sys.exit(main())

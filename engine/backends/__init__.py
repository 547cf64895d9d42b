"""The runtime layer: one factory for every way to run a defended model, used by `scc bench`, `scc eval`, the
pytest-benchmark suite, benchmarks/gpu_check.py and the server.

    runner = make_runner(scc.defend(clf, "scc", preset="latency"), "compiled", batch_size=8)
    logits = runner(x, draws)          # draws=None: the defended module's own draws, as in eager
    runner.compile_seconds             # compile / export time, measured here (None for eager)

backends:
    eager     the `Defended` module itself (the reference every other backend is compared with)
    compiled  scc.backends.compiled.Engine: one torch.compile graph per batch bucket (1, 2, 4, ..., batch_size)
    triton    the same engine with the hand-written kernels of scc.kernels inside the graph
    onnx      scc.export.export_onnx (draws as inputs, so a runner replays eager's draws) + OrtDefended

A defense a backend cannot run (its `Defense` record says so) and a backend whose module is missing raise
`BackendUnavailable` up front, with the reason; anything else that fails while building a supported backend is
a real error and propagates.

    compiled.py   the compiled engine (one static-shaped torch.compile graph per batch bucket)
    artifacts.py  torch.compile cache artifacts a compiled replica saves and loads
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..defenses import Defended, Defense
from ..errors import SccError, install_hint
from ..precision import DTYPES

BACKENDS = ("eager", "compiled", "triton", "onnx")
CAPABILITY = {"eager": None, "compiled": "compiles", "triton": "compiles", "onnx": "exports"}


class BackendUnavailable(SccError):
    """The backend cannot run here or cannot run this defense (not an error in the user's command)."""


@dataclass
class Runner:
    """A built backend: `runner(x, draws=None) -> logits` on the defended model's device; `spec` names the
    defense it runs (e.g. "scc-latency")."""
    backend: str
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    run: Callable[[torch.Tensor, dict | None], torch.Tensor] = field(repr=False)
    spec: str | None = None  # the defense's spec, e.g. "scc-latency" (scc.defenses.Defended.spec)
    compile_seconds: float | None = None  # compile (compiled/triton) or export (onnx) time; None for eager
    details: dict = field(default_factory=dict)  # e.g. the kernels that run, the ONNX file
    # compiled/triton: warmup(n) compiles the bucket that holds n images (make_runner compiles only the largest;
    # a server compiles every bucket before it reports ready); None where nothing compiles per batch size
    warmup: Callable[[int], float] | None = field(default=None, repr=False)
    defense: InitVar[str | None] = None  # deprecated keyword: the spec, as `spec`

    def __post_init__(self, defense: str | None) -> None:
        if defense is not None:
            warnings.warn("Runner(defense=...) is deprecated; use Runner(spec=...)", DeprecationWarning,
                          stacklevel=3)
            self.spec = self.spec or defense
        if self.spec is None:
            raise TypeError("Runner needs spec=, the defense it runs (e.g. 'scc-latency')")

    def __call__(self, x: torch.Tensor, draws: dict | None = None) -> torch.Tensor:
        return self.run(x, draws)


def _runner_defense(self: Runner) -> str:
    """Deprecated: use `spec` (the same string; this name goes in the next release)."""
    warnings.warn("Runner.defense is deprecated; use Runner.spec", DeprecationWarning, stacklevel=2)
    return self.spec


Runner.defense = property(_runner_defense)  # after @dataclass, which read `defense` as the keyword's default


def parse_backends(text: str) -> list[str]:
    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise SccError(f"unknown backend(s) {unknown or [text]}; choose from {', '.join(BACKENDS)} (comma-separated)")
    return names


def supports(defense: Defense, backend: str) -> bool:
    """Whether `backend` can run this defense, from its Defense record (its module may still be missing)."""
    capability = CAPABILITY[backend]
    return capability is None or bool(getattr(defense, capability))


def make_runner(defended: Defended, backend: str, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None, workdir: str | Path | None = None,
                mode: str | None = None, freeze: bool | None = None) -> Runner:
    """Build `backend` for `defended` at `batch_size` (the compiled buckets up to it are compiled here; the ONNX
    file has that fixed batch). `dtype` of the image tower: fp32 everywhere; bf16 / fp16 (weights and
    activations; the perturbation and losses fp32) on eager, compiled and triton (fp16 where matmuls are native).
    `device` must be the classifier's (move the classifier with `.to(device)` first). `workdir` holds the ONNX
    file (a temporary folder by default). `mode` and `freeze` (Inductor freezing; default on for CPU) are the
    compiled/triton engine's (see scc.backends.compiled)."""
    if backend not in BACKENDS:
        raise SccError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SccError(f"batch size must be a positive integer, got {batch_size!r}")
    here = defended.classifier.text.device
    if device is not None and torch.device(device) != here:
        raise SccError(f"the model is on {here}, not {device}: load it with device={str(device)!r}")
    if dtype not in DTYPES.values():
        raise SccError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if dtype != torch.float32 and backend == "onnx":
        raise BackendUnavailable("backend onnx runs fp32 files here (ONNX Runtime's CPU provider has no bf16 "
                                 "kernels); reduced precision runs on eager, compiled and triton")
    what = defended.spec
    if not supports(defended.record, backend):
        raise BackendUnavailable(f"backend {backend} cannot run {what}: {defended.record.why_not}")
    common = dict(backend=backend, spec=what, batch_size=batch_size, dtype=dtype, device=here)
    if backend == "eager":
        defended = defended.with_dtype(dtype)  # a reduced-precision tower (same draws), or the module itself
        return Runner(run=lambda x, draws=None: defended(x, draws), **common)
    try:
        if backend in ("compiled", "triton"):
            from .compiled import Engine
        else:
            from ..export import OrtDefended, export_onnx
    except ImportError as err:
        module = "scc.backends.compiled.Engine" if backend != "onnx" else "scc.export (onnx, onnxscript, onnxruntime)"
        raise BackendUnavailable(f"backend {backend} is not available: cannot import {module} ({err}); "
                                 f"{install_hint('onnx')}, or use the eager backend") from err
    if backend in ("compiled", "triton"):
        engine = Engine(defended.with_dtype(torch.float32), backend=backend, max_batch=batch_size, mode=mode,
                        dtype=dtype, freeze=freeze)
        seconds = float(engine.warmup(batch_size))
        return Runner(run=lambda x, draws=None: engine(x, draws), compile_seconds=seconds,
                      details={"kernels": engine.kernels, "buckets": engine.buckets}, warmup=engine.warmup, **common)
    folder = Path(workdir or tempfile.mkdtemp(prefix="scc-onnx-"))
    path = folder / f"{defended.classifier.name}-{what}-b{batch_size}.onnx"
    info = export_onnx(defended, str(path), batch_size=batch_size, draws_as_inputs=True)
    session = OrtDefended(info.get("path", str(path)), threads=torch.get_num_threads())  # as torch's --threads

    def run(x, draws=None):
        return torch.as_tensor(session(x, defended.draws(x) if draws is None else draws))

    return Runner(run=run, compile_seconds=float(info["seconds"]), details={"onnx": str(path)}, **common)

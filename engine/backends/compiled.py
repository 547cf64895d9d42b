"""The compiled engine: a whole test-time defense as one static-shaped `torch.compile` graph per batch bucket.

    engine = scc.backends.compiled.Engine(scc.defend(clf, "scc"), backend="compiled", max_batch=8)
    engine.warmup(1); engine.warmup(8)   # compile up front: returns (and keeps in engine.compile_seconds) seconds
    logits = engine(x)                    # draws default to defended.draws(x), exactly as the eager module's

One graph holds the whole procedure (warm-up counterattack, views, prototype, corrective steps, view-averaged
logits): the defense's own procedure `scc.DEFENSES[name].procedure` traced with fullgraph=True and dynamic=False, its
gradients from torch.func.grad, its randomness only from the draw tensors passed in (no RNG call in the graph).

Batches: a request of n images is cut into chunks of at most `max_batch`; a chunk runs in the smallest bucket
(1, 2, 4, ..., max_batch) that holds it and is already compiled, else in its own bucket, compiled then (with
a warning: call `warmup` first). Padding rows repeat the chunk's last image and draws, so they compute what a
real row would and never produce NaNs; the outputs are sliced back.

The engine owns its graphs and its copy of the classifier (scc.precision.engine_classifier: weights shared with
the caller's and frozen, patch convs as matmuls, dtype=torch.bfloat16 / torch.float16 runs the image tower in that
type while the perturbation, its steps, the losses and the logits stay fp32, fp16 only where matmuls are native);
on CPU attention runs as SDPA's math decomposition, which Inductor fuses (flash attention for 17 tokens costs more
than the attention itself).
backend="triton" routes the sign steps and the forward-only view batches (Stage 3, a separate Stage 1) through
scc.kernels: the engine's classifier copy carries the launchers (`classifier.kernels`), so the choice is the
engine's own and two engines with different kernels can serve in one process. Views inside gradient closures
stay torch ops that Inductor fuses, because a custom op's autograd does not run under torch.func.grad
(https://github.com/pytorch/pytorch/issues/170834). `engine.kernels` says what actually runs: on CPU without TRITON_INTERPRET=1, or with zoom views, the
torch references. One engine serves one caller at a time (CUDA-graph outputs are cloned before the next replay
can overwrite them).
mode: None, "max-autotune-no-cudagraphs", or on CUDA "reduce-overhead" / "max-autotune" (CUDA graphs;
outputs are cloned out of the graph's memory).

freeze (default: on for CPU): Inductor's freezing while a bucket compiles. The graph is an inference graph (no
gradient leaves it; its input gradients are internal), so the weights can be constants of it: Inductor then
pre-packs each matmul's weight once, for the forward and for the input-gradient products (oneDNN for bf16, MKL
for fp32), instead of re-laying it out on every call. The engine's weights are frozen already (scc.precision
engine_classifier); a caller who changes the classifier's weights builds a new engine.

packages=FOLDER: buckets whose AOTInductor package (scc.backends.packages, written by `build_packages`) is in
FOLDER are loaded from it in seconds instead of compiled; the others compile as usual. A package is code: one that
is unsigned, signed under another key (package_key_file=, else FOLDER/scc-cache.key), changed, or writable by
others is refused with one line on stderr, and that bucket compiles instead.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import time
import types
import warnings

import torch
import torch._inductor.config as inductor_config

from ..attention import attention
from ..batching import padded_chunks, power_of_two_buckets
from ..defenses import Defended
from ..defenses.scc import SCCConfig
from ..errors import SccError
from ..precision import DTYPES, check_dtype_on_device, engine_classifier
from ..timing import sync
from ..validation import validate_draws, validate_pixels

ENGINE_BACKENDS = ("compiled", "triton")  # the scc.backends names this engine serves
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def own_code(fn, name: str):
    """`fn` with a code object of its own. Dynamo keeps compiled graphs, guards and its recompile limit per code
    object, so each (engine, bucket) graph gets its own cache: no limit shared by all engines of a process."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def drop_compiled_graphs() -> None:
    """Let go of every graph torch holds for the process once its engines are gone. Dynamo caches graphs per code
    object, and Inductor keeps each loaded graph module, with its frozen, pre-packed weights as attributes, in
    PyCodeCache and in sys.modules, which dynamo's reset leaves alone. A live engine breaks after this (dynamo
    recompiles under its guard stance): call it only when no engine of the process is used again."""
    torch._dynamo.reset()
    from torch._inductor.codecache import PyCodeCache

    for module in PyCodeCache.modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
    PyCodeCache.cache_clear()  # the modules in memory; their source files stay on disk for later compiles
    gc.collect()


def kernel_launchers() -> dict:
    from ..kernels import sign_step, view_augment  # imports triton: TRITON_INTERPRET is read here

    return {"sign_step": sign_step.sign_step, "view_augment": view_augment.view_augment}


def kernel_status(device: torch.device) -> dict[str, str]:
    from ..kernels import sign_step, view_augment

    return {"sign_step": sign_step.status(device), "view_augment": view_augment.status(device)}


class Engine:
    """`engine(x, draws=None, trace=None) -> logits`, the compiled counterpart of `defended(x, draws, trace)`."""

    def __init__(self, defended: Defended, backend: str = "compiled", max_batch: int = 8, mode: str | None = None,
                 dtype: torch.dtype = torch.float32, freeze: bool | None = None, packages: str | None = None,
                 package_key_file: str | None = None):
        if not isinstance(defended, Defended):
            raise SccError(f"Engine wraps a scc.defend(...) module, got {type(defended).__name__}")
        if backend not in ENGINE_BACKENDS:
            raise SccError(f"unknown backend {backend!r} for the compiled engine; choose from {ENGINE_BACKENDS}")
        if mode not in MODES:
            raise SccError(f"unknown compile mode {mode!r}; choose from {MODES}")
        if dtype not in DTYPES.values():
            raise SccError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        defended.record.require(backend, "compiles")
        if defended.dtype != torch.float32:  # the engine builds its own reduced copy from the fp32 tower
            dtype, defended = defended.dtype, defended.with_dtype(torch.float32)
        check_dtype_on_device(dtype, defended.classifier.text.device)
        self.defended, self.backend, self.mode, self.dtype = defended, backend, mode, dtype
        self.device = defended.classifier.text.device
        # Inductor freezing: the weights become constants of the graph, which lets it pre-pack every matmul's
        # weight once (oneDNN for bf16, MKL for fp32) instead of re-laying it out on every call
        self.freeze = self.device.type == "cpu" if freeze is None else bool(freeze)
        if packages is not None and (backend != "compiled" or mode is not None):
            raise SccError("AOTInductor packages (packages=FOLDER) hold the plain compiled graph: use them with "
                           f"backend='compiled' and mode=None, not backend={backend!r}, mode={mode!r}")
        self.packages = packages  # a folder of AOTInductor packages (scc.backends.packages) to load buckets from
        self.package_key_file = package_key_file  # the packages' HMAC key (default: packages/scc-cache.key)
        self.loaded_packages: dict[int, str] = {}  # bucket -> the package file it runs
        self.refused_packages: dict[int, str] = {}  # bucket -> why its package was not loaded (it compiled)
        self.buckets = power_of_two_buckets(max_batch)
        self.max_batch = max_batch
        self.cuda_graphs = mode in CUDA_GRAPH_MODES
        if self.cuda_graphs and self.device.type != "cuda":
            raise SccError(f"mode {mode!r} captures CUDA graphs and needs a CUDA model, this one is on "
                           f"{self.device}; use mode=None")
        self.procedure = defended.record.procedure
        self.draw_keys = tuple(sorted(defended.record.draw_specs))
        self.kernels: dict[str, str] = {"sign_step": "torch (compiled)", "view_augment": "torch (compiled)"}
        launchers: dict = {}
        if backend == "triton":
            launchers = kernel_launchers()
            self.kernels = kernel_status(self.device)
            views = defended.config.stage_views() if isinstance(defended.config, SCCConfig) else ()
            if not views:
                self.kernels["view_augment"] = f"unused ({defended.defense} has no views)"
            elif any(v.zoom != 1.0 for v in views):
                self.kernels["view_augment"] = "reference (zoom views: the kernel has no zoom)"
            fallback = {k: v for k, v in self.kernels.items() if v.startswith("reference")}
            if fallback:
                warnings.warn(f"scc.backends.compiled.Engine(backend='triton') on {self.device}: "
                              + "; ".join(f"{k} runs its {v}" for k, v in fallback.items()), stacklevel=2)
        self.classifier = engine_classifier(defended.classifier, dtype, launchers)
        self.compile_seconds: dict[int, float] = {}  # bucket -> seconds of its first (compiling) call
        self.trace_compile_seconds: dict[int, float] = {}  # the same for the traced graphs (tests, diagnostics)
        self._graphs: dict[tuple[int, bool], object] = {}
        self._packaged: dict[int, tuple] = {}  # bucket -> (loaded scc.backends.packages.Package, draw order)

    # ------------------------------------------------------------------------------------------------------
    def _graph(self, bucket: int, traced: bool):
        key = (bucket, traced)
        if key not in self._graphs:
            procedure, clf, cfg, keys, device = self.procedure, self.classifier, self.defended.config, \
                self.draw_keys, self.device

            def defense(x, *draws):
                kwargs = dict(zip(keys, draws))
                trace = [] if traced else None
                if traced:
                    kwargs["trace"] = trace
                with attention("compile", device):
                    logits = procedure(clf, x, cfg, **kwargs)
                return (logits, *trace) if traced else logits

            name = f"scc_{self.defended.defense}_{self.backend}_b{bucket}{'_trace' if traced else ''}_{id(self):x}"
            self._graphs[key] = torch.compile(own_code(defense, name), fullgraph=True, dynamic=False,
                                              mode=None if self.mode == "default" else self.mode)
        return self._graphs[key]

    def _run(self, bucket: int, traced: bool, x: torch.Tensor, draws: list[torch.Tensor]):
        # Once a graph is compiled its guards are skipped: it is the only entry of its own code object and the
        # inputs are checked here instead (shape = bucket, float32, device, contiguous; no grad).
        if not traced and bucket in self._packaged:
            package, order = self._packaged[bucket]
            with torch.no_grad():
                return (package(x, [draws[i] for i in order]),)
        compiled = bucket in self._times(traced)
        with torch.no_grad(), \
                torch.compiler.set_stance(skip_guard_eval_unsafe=True) if compiled else contextlib.nullcontext():
            out = self._graph(bucket, traced)(x, *draws)
        return out if isinstance(out, tuple) else (out,)

    def _times(self, traced: bool) -> dict[int, float]:
        return self.trace_compile_seconds if traced else self.compile_seconds

    def bucket_for(self, n: int, traced: bool = False) -> int:
        """The bucket a chunk of n <= max_batch images runs in: the smallest compiled one that holds it, else
        the smallest that holds it."""
        warm = [b for b in sorted(self._times(traced)) if b >= n]
        return warm[0] if warm else next(b for b in self.buckets if b >= n)

    def _compile(self, bucket: int, traced: bool) -> float:
        times = self._times(traced)
        if bucket not in times and not traced and self.packages is not None:
            from .packages import PackageRefused, find_package, open_package

            path = find_package(self.defended, self.packages, bucket, self.dtype)
            if path:  # load instead of compiling
                try:
                    package = open_package(path, self.packages, bucket, self.package_key_file)
                except PackageRefused as err:  # never run code someone else could have written: compile instead
                    print(f"scc: not loading an AOTInductor package: {err}; compiling bucket {bucket} instead",
                          file=sys.stderr)
                    self.refused_packages[bucket] = str(err)
                else:  # the package's draw inputs, as positions in the engine's draw order
                    order = [self.draw_keys.index(k) for k in package.inputs[1:]]
                    self._packaged[bucket], self.loaded_packages[bucket] = (package, order), package.path
                    times[bucket] = package.load_seconds
        if bucket not in times:
            x, draws = self.defended.example_inputs(bucket, device=self.device)
            args = [draws[k] for k in self.draw_keys]
            start = time.perf_counter()
            # freezing is read while Dynamo traces (parameters become graph attributes) and while Inductor
            # compiles, so it is switched on around the compiling call only, never process-wide
            freezing = inductor_config.patch(freezing=True) if self.freeze else contextlib.nullcontext()
            try:
                with freezing:
                    self._run(bucket, traced, x, args)
            except torch._dynamo.exc.Unsupported as err:  # fullgraph=True: a graph break is an error
                first = str(err).strip().splitlines()[0]
                raise SccError(f"defense {self.defended.defense!r} does not compile into one graph: {first}; "
                               "use the eager module (backend eager) for it") from err
            sync(self.device)
            times[bucket] = time.perf_counter() - start
            if self.cuda_graphs:  # cudagraph trees record on a later call: keep that out of the first request too
                for _ in range(2):
                    self._run(bucket, traced, x, args)
                sync(self.device)
        return times[bucket]

    def warmup(self, batch_size: int) -> float:
        """Compile the bucket for `batch_size` images (at most max_batch); returns its compile seconds."""
        if not isinstance(batch_size, int) or not 1 <= batch_size <= self.max_batch:
            raise SccError(f"warmup takes a batch size in 1..max_batch={self.max_batch}, got {batch_size!r}")
        return self._compile(next(b for b in self.buckets if b >= batch_size), traced=False)

    def build_packages(self, folder: str, buckets: list[int] | None = None,
                       key_file: str | None = None) -> list[dict]:
        """Write an AOTInductor package (scc.backends.packages) of this engine's graph for each bucket (default:
        all) into `folder`; an Engine(..., packages=folder) with the same settings then loads them instead of
        compiling. Returns build_package's info per bucket."""
        from .packages import build_package

        if self.backend != "compiled" or self.mode is not None:
            raise SccError("packages hold the plain compiled graph: build them from Engine(backend='compiled', "
                           "mode=None)")
        return [build_package(self.defended, folder, b, self.dtype, freeze=self.freeze, key_file=key_file)
                for b in (buckets or self.buckets)]

    # ------------------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, draws: dict[str, torch.Tensor] | None = None,
                 trace: list | None = None, keys=None) -> torch.Tensor:
        """Logits (n, C) for pixels x (n, 3, S, S) in [0,1]. Draws default to the defended module's per-image
        draws (for `keys`, else its running index), exactly as in eager. `trace`, a list, receives each step's
        gradient sign (n, 3, S, S), as with the eager module (this runs a separate traced graph)."""
        validate_pixels(x, self.classifier.image_size, dtype=torch.float32, device=self.device, values=False)
        draws = self.defended.draws(x, keys) if draws is None else draws
        args = validate_draws(draws, self.draw_keys, x.shape[0], dtype=torch.float32, device=self.device,
                              what=self.defended.defense)
        traced = trace is not None
        outs = []
        for _, n, rows in padded_chunks([x.contiguous(), *(a.contiguous() for a in args)], self.max_batch,
                                        lambda n: self.bucket_for(n, traced)):
            bucket = rows[0].shape[0]
            if bucket not in self._times(traced):
                if not traced:
                    warnings.warn(f"scc.backends.compiled.Engine: compiling bucket {bucket} inside a request; call "
                                  f"engine.warmup({bucket}) at start-up", stacklevel=2)
                self._compile(bucket, traced)
            res = self._run(bucket, traced, rows[0], rows[1:])
            outs.append([r[:n].clone() if self.cuda_graphs else r[:n] for r in res])
        logits = torch.cat([o[0] for o in outs]) if len(outs) > 1 else outs[0][0]
        if traced:
            trace.extend(torch.cat([o[i] for o in outs]) for i in range(1, len(outs[0])))
        return logits

    def __repr__(self) -> str:
        return (f"Engine({self.defended.defense}-{self.defended.preset}, backend={self.backend}, mode={self.mode}, "
                f"dtype={self.dtype}, freeze={self.freeze}, buckets={self.buckets}, "
                f"compiled={sorted(self.compile_seconds)}, "
                f"kernels={self.kernels})")

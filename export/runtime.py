"""Run an exported defense with ONNX Runtime: `OrtDefended("scc.onnx")(pixels) -> logits`.

Same contract as `scc.Defended`: float32 pixels (N, 3, S, S) in [0, 1], numpy or torch, -> torch logits (N, C)
on the input's device (validated like the eager module's: shape, dtype, NaN/Inf, range). Draws it makes itself
are per image, from (seed, key), following the distributions its defense declares, as `scc.Defended` makes them.

Batch. A batch-dynamic file (the default export; input shape ("batch", 3, S, S)) runs N images as one batch
(or in chunks of `max_batch` when given). A fixed-batch file (`--batch-size B`) runs N images in chunks of B,
the last chunk padded by repeating its last image (scc.batching.padded_chunks: padded rows cost compute and are
dropped; every image is defended independently, so padding never changes the other rows).

Providers: the CUDA execution provider when the installed ONNX Runtime has it and torch sees a CUDA device,
else the CPU provider; pass `providers=[...]` to choose. On CUDA, inputs and outputs go through IOBinding
(torch CUDA tensors are bound in place, no host round trip). The `onnx` extra installs plain `onnxruntime` (CPU),
`onnx-gpu` installs `onnxruntime-gpu`; both provide the same `onnxruntime` module: with the plain one, or when the
CUDA provider cannot start, the session runs on CPU and a RuntimeWarning says so.

CUDA graphs (`cuda_graph=True`, GPU only). ORT's CUDA provider can capture the whole run as one CUDA graph and
replay it (`enable_cuda_graph`): no per-node launch cost, which is what batch-1 latency on a GPU is made of. It
needs static shapes, every node on the CUDA provider, no in-graph randomness (a replay would repeat the same
draws) and inputs/outputs at the same device addresses on every run. So it takes a fixed-batch file exported
with the draws as inputs (`scc export onnx --batch-size B --draws-as-inputs`); `OrtDefended` then binds
persistent device buffers once (`StaticIOBinding`), copies each chunk into them and clones the outputs.
Anything else is refused with an SccError before a session is made. `benchmark_cuda_graph(path)` measures it
against plain IOBinding.
"""
from __future__ import annotations

import json
import secrets
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..batching import padded_chunks
from ..defenses import DEFENSES
from ..draws import keyed_draws
from ..errors import SccError, install_hint
from ..images import Preprocess
from ..models import BUNDLED
from ..metrics import top1_agreement
from ..timing import summarize, sync, time_calls, warm_up
from ..validation import validate_pixels

_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                 torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def import_onnxruntime():
    """onnxruntime (from the `onnx` extra, or `onnx-gpu` for the CUDA build) or an SccError."""
    try:
        import onnxruntime
    except ImportError as err:
        raise SccError(f"ONNX Runtime is not installed ({err}); {install_hint('onnx')}, or the extra onnx-gpu "
                       "for NVIDIA GPUs") from err
    return onnxruntime


def default_providers(ort=None) -> list[str]:
    """CUDA first when the installed ONNX Runtime has it and torch sees a CUDA device, then CPU."""
    ort = ort or import_onnxruntime()
    available = ort.get_available_providers()
    # onnxruntime-gpu lists the CUDA provider even on machines without a GPU; ask torch whether one is usable.
    if torch.cuda.is_available():
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        warnings.warn(f"a CUDA device is present but this ONNX Runtime ({ort.__version__}) has no CUDA provider "
                      f"(providers {available}): running on CPU; for the GPU install the extra onnx-gpu "
                      "(onnxruntime-gpu) in place of onnxruntime",
                      RuntimeWarning, stacklevel=3)
    return ["CPUExecutionProvider"]


def _peek_inputs(path: Path) -> tuple[dict[str, list], dict[str, str]]:
    """({input name: shape, a str for a symbolic dim}, metadata) of an ONNX file, without loading its weights
    into a session."""
    try:
        import onnx
    except ImportError as err:
        raise SccError(f"reading {path} needs the onnx package ({err}); pip install 'scc-defense[onnx]'") from err
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                       for d in v.type.tensor_type.shape.dim]
              for v in model.graph.input if v.name not in inits}
    return shapes, {p.key: p.value for p in model.metadata_props}


def check_cuda_graph_file(path: str | Path, shapes: dict[str, list], metadata: dict[str, str]) -> None:
    """SccError unless the file can be captured as one ORT CUDA graph: every input shape fixed (a number in
    each dimension) and no random draws inside the graph. `shapes`: input name -> dims (str = symbolic)."""
    dynamic = {name: dims for name, dims in shapes.items() if not all(isinstance(d, int) and d > 0 for d in dims)}
    if dynamic:
        name, dims = next(iter(dynamic.items()))
        raise SccError(f"cuda_graph=True needs a fixed-shape file, but {path} has a dynamic input {name} "
                       f"{tuple(dims)}; export one with `scc export onnx ... --batch-size N --draws-as-inputs`")
    drawn = json.loads(metadata.get("scc.draws", "{}"))
    if drawn and not json.loads(metadata.get("scc.draws_as_inputs", "false")):
        raise SccError(f"cuda_graph=True cannot replay {path}: it draws {sorted(drawn)} inside the graph and a "
                       "captured graph would repeat the same draws on every run; export with --draws-as-inputs "
                       "(and --batch-size N)")


def cuda_provider_options(device_id: int = 0, cuda_graph: bool = False) -> dict[str, str]:
    """Options of ORT's CUDAExecutionProvider: the device, and `enable_cuda_graph` when capturing."""
    options = {"device_id": str(int(device_id))}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def with_provider_options(providers: Sequence, device_id: int = 0, cuda_graph: bool = False) -> list:
    """`providers` with the CUDA provider given its options (a (name, options) pair, as InferenceSession takes)."""
    out = []
    for p in providers:
        name, options = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name == "CUDAExecutionProvider":
            out.append((name, {**cuda_provider_options(device_id, cuda_graph), **options}))
        else:
            out.append(p)
    return out


class StaticIOBinding:
    """IOBinding to buffers that never move: inputs and outputs are preallocated torch tensors on `device`
    (fixed shapes), bound once; `run(feeds)` copies the feeds into the input buffers, runs, and returns clones
    of the outputs. What ORT CUDA graph capture needs (the same addresses on every replay); on CPU it runs
    the same way (used by the tests)."""

    def __init__(self, session, device: torch.device):
        self.session, self.device = session, torch.device(device)
        kind, index = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)
        self.binding = session.io_binding()
        self.inputs, self.outputs = {}, []
        for meta in session.get_inputs():
            if not all(isinstance(d, int) for d in meta.shape):
                raise SccError(f"static IO binding needs fixed input shapes, {meta.name} has {meta.shape}")
            buf = torch.zeros(meta.shape, dtype=_ORT_DTYPES.get(meta.type, torch.float32), device=self.device)
            self.binding.bind_input(meta.name, kind, index, _NUMPY_DTYPES[buf.dtype], list(buf.shape), buf.data_ptr())
            self.inputs[meta.name] = buf
        for meta in session.get_outputs():
            if not all(isinstance(d, int) for d in meta.shape):
                raise SccError(f"static IO binding needs fixed output shapes, {meta.name} has {meta.shape}")
            buf = torch.empty(meta.shape, dtype=_ORT_DTYPES.get(meta.type, torch.float32), device=self.device)
            self.binding.bind_output(meta.name, kind, index, _NUMPY_DTYPES[buf.dtype], list(buf.shape), buf.data_ptr())
            self.outputs.append(buf)

    def addresses(self) -> list[int]:
        return [t.data_ptr() for t in (*self.inputs.values(), *self.outputs)]

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        for name, buf in self.inputs.items():
            buf.copy_(feeds[name])
        sync(self.device)  # the copies are complete before ORT's stream reads the buffers
        self.session.run_with_iobinding(self.binding)
        if self.device.type == "cuda":
            self.binding.synchronize_outputs()
        return [o.clone() for o in self.outputs]  # the next run overwrites the buffers


class OrtDefended:
    """An exported defended classifier on ONNX Runtime: `__call__(x, draws=None, trace=None) -> logits`.

    `draws` (a dict like `Defended.draws(x)`, N rows) only for files exported with draws_as_inputs; when such a
    file gets no draws they are made here per image, exactly as `scc.Defended` makes them: image b's draws from
    (seed, keys[b]) (seed=None: a fresh secret one; keys: a running index unless given), so a file and the eager
    module with the same seed and keys agree image by image. `trace`, a list, collects each step's gradient sign
    for files exported with trace_outputs (as `Defended(x, trace=[])`).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 seed: int | None = None, max_batch: int | None = None, cuda_graph: bool = False,
                 device_id: int = 0):
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise SccError(f"ONNX file {path} does not exist; write one with `scc export onnx ... --out {path}`")
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise SccError(f"max_batch must be a positive integer or None (all images in one run), got {max_batch!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        providers = list(providers) if providers is not None else default_providers(ort)
        names = [p if isinstance(p, str) else p[0] for p in providers]
        if cuda_graph:
            check_cuda_graph_file(path, *_peek_inputs(path))
            if "CUDAExecutionProvider" not in names or not torch.cuda.is_available() or \
                    "CUDAExecutionProvider" not in ort.get_available_providers():
                raise SccError(f"cuda_graph=True needs ONNX Runtime's CUDA provider and a CUDA device (onnxruntime-gpu "
                               f"on a GPU machine); here torch.cuda.is_available()={torch.cuda.is_available()}, "
                               f"requested providers {names}, installed {ort.get_available_providers()}")
        providers = with_provider_options(providers, device_id, cuda_graph)
        self.session = self._load(ort, path, options, providers, strict=cuda_graph)
        if "CUDAExecutionProvider" in names and "CUDAExecutionProvider" not in self.session.get_providers():
            warnings.warn(f"ONNX Runtime could not start its CUDA provider for {path}; running on CPU "
                          f"(providers {self.session.get_providers()})", RuntimeWarning, stacklevel=2)
        self.path = path
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        cuda_options = self.session.get_provider_options().get("CUDAExecutionProvider", {})
        self.device_id = int(cuda_options.get("device_id", 0))
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.labels = json.loads(meta["scc.labels"]) if "scc.labels" in meta else None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "pixels" not in self.inputs or self.output_names[0] != "logits":
            raise SccError(f"{path} is not an scc export: it needs an input 'pixels' and a first output 'logits', "
                           f"it has inputs {list(self.inputs)} and outputs {self.output_names}")
        shape = self.inputs["pixels"].shape
        self.batch_size = shape[0] if isinstance(shape[0], int) else None  # None: dynamic batch
        self.image_shape = tuple(shape[1:])
        # the exported model's own image preprocessing: `ort(ort.preprocess.file(path)[None])` answers as
        # `scc classify` does for that file
        if "scc.preprocess" in meta:
            self.preprocess = Preprocess.from_dict(json.loads(meta["scc.preprocess"]))
        else:  # an older export: the CLIP rule, which is wrong for a model trained on framed or uncropped images
            self.preprocess = Preprocess(int(self.image_shape[-1]))
            if meta.get("scc.model") in BUNDLED:
                warnings.warn(f"{path} records no image preprocessing (exported by an older scc): `.preprocess` "
                              f"falls back to the CLIP rule, not {meta['scc.model']}'s own; export it again",
                              RuntimeWarning, stacklevel=2)
        self.draw_names = [n for n in self.inputs if n != "pixels"]
        self.seed = seed
        self._secret = secrets.randbits(63) if seed is None else int(seed)
        self.next_key = 0
        self.max_batch = max_batch
        self.cuda_graph = cuda_graph
        # CUDA graphs: persistent device buffers at the file's batch, bound once (the first runs capture)
        self.static_io = StaticIOBinding(self.session, torch.device("cuda", self.device_id)) if cuda_graph else None

    @staticmethod
    def _load(ort, path: Path, options, providers: list, strict: bool = False):
        names = [p if isinstance(p, str) else p[0] for p in providers]
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types; its message says what failed
            if strict:  # CUDA graph capture: no silent CPU fallback
                raise SccError(f"ONNX Runtime could not load {path} for CUDA graph capture with {providers}: {err}; "
                               "every node must run on the CUDA provider (retry without cuda_graph)") from err
            if names != ["CPUExecutionProvider"] and "CPUExecutionProvider" in names:
                warnings.warn(f"ONNX Runtime could not load {path} with {providers} ({err}); retrying on CPU",
                              RuntimeWarning, stacklevel=3)
                return OrtDefended._load(ort, path, options, ["CPUExecutionProvider"])
            raise SccError(f"ONNX Runtime could not load {path} with providers {providers}: {err}") from err

    def __repr__(self) -> str:
        return (f"OrtDefended({str(self.path)!r}, batch_size={self.batch_size or 'dynamic'}, providers={self.providers}, "
                f"draws={'inputs ' + str(self.draw_names) if self.draw_names else 'in-graph'}"
                f"{', cuda_graph' if self.cuda_graph else ''})")

    # -- input checks --------------------------------------------------------------------------------------
    def _expected(self, name: str) -> str:
        return "(N, " + ", ".join(str(d) for d in self.inputs[name].shape[1:]) + ")"

    def _check(self, name: str, value, rows: int | None) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise SccError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")
        want = _ORT_DTYPES.get(self.inputs[name].type, torch.float32)
        if value.dtype != want:
            hint = "scale uint8 images to [0,1] floats: x.float() / 255" if value.dtype == torch.uint8 else \
                "convert with x.float() (torch) or x.astype(np.float32) (numpy)"
            raise SccError(f"{name}: expected dtype {str(want).removeprefix('torch.')}, "
                           f"got {str(value.dtype).removeprefix('torch.')}; {hint}")
        expected = tuple(self.inputs[name].shape[1:])
        if value.dim() != len(expected) + 1 or tuple(value.shape[1:]) != expected:
            raise SccError(f"{name}: expected shape {self._expected(name)}, got {tuple(value.shape)}"
                           + ("; preprocess image files first: ort.preprocess.file(path)" if name == "pixels" else ""))
        if rows is not None and value.shape[0] != rows:
            raise SccError(f"{name}: expected {rows} rows, one per image, got {value.shape[0]}")
        if name == "pixels":  # NaN/Inf and the [0,1] range, as the eager module checks them
            validate_pixels(value)
        return value

    def _make_draws(self, pixels: torch.Tensor, keys=None) -> dict[str, torch.Tensor]:
        """Per-image draws for a file with draw inputs, from the distributions its defense declares."""
        defense = DEFENSES.get(self.metadata.get("scc.defense", ""))
        unknown = [k for k in self.draw_names if defense is None or k not in defense.draw_specs]
        if unknown:
            raise SccError(f"{self.path} takes the draws {self.draw_names}, which its metadata's defense "
                           f"{self.metadata.get('scc.defense')!r} does not declare: pass draws=defended.draws(x)")
        n = pixels.shape[0]
        if keys is None:
            keys, self.next_key = list(range(self.next_key, self.next_key + n)), self.next_key + n
        elif len(keys) != n:
            raise SccError(f"keys: one per image, got {len(keys)} keys for {n} images")
        specs = {k: defense.draw_specs[k] for k in self.draw_names}
        shapes = {k: tuple(self.inputs[k].shape[1:]) for k in self.draw_names}
        try:
            return keyed_draws(specs, None, pixels, self._secret, list(keys), shapes=shapes)
        except AttributeError as err:  # a bound that depends on the defense config, which the file does not carry
            raise SccError(f"{self.path}: a draw depends on the defense config: pass draws=defended.draws(x)") from err

    # -- running -------------------------------------------------------------------------------------------
    def __call__(self, x, draws: dict | None = None, trace: list | None = None, keys=None) -> torch.Tensor:
        pixels = self._check("pixels", x, None)
        n = pixels.shape[0]
        if draws and not self.draw_names:
            raise SccError(f"{self.path} draws its random values inside the graph and takes no draws; "
                           "export with draws_as_inputs=True (--draws-as-inputs) to feed them")
        if draws is None or (not draws and self.draw_names):
            draws = self._make_draws(pixels, keys)
        missing = [k for k in self.draw_names if k not in draws]
        if missing:
            raise SccError(f"draws lack {missing}: this file needs {self.draw_names}")
        feeds = {"pixels": pixels, **{k: self._check(k, draws[k], n) for k in self.draw_names}}
        if n == 0:
            return torch.empty((0, *self.session.get_outputs()[0].shape[1:]), dtype=torch.float32)
        size = self.batch_size or min(n, self.max_batch or n)  # dynamic file: one run (or max_batch rows)
        pad = (lambda rows: size) if self.batch_size else (lambda rows: rows)  # only a fixed file is padded
        chunks = [[o[:rows] for o in self._run(dict(zip(feeds, part)))]
                  for _, rows, part in padded_chunks(list(feeds.values()), size, pad)]
        outputs = [torch.cat(parts).to(pixels.device) for parts in zip(*chunks)]
        if trace is not None:
            if len(outputs) == 1:
                raise SccError(f"{self.path} has no step outputs; export with trace_outputs=True to trace")
            trace.extend(outputs[1:])
        return outputs[0]

    def _run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.static_io is not None:
            return self.static_io.run(feeds)
        if not self.on_cuda:
            arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
            return [torch.from_numpy(o) for o in self.session.run(self.output_names, arrays)]
        device = torch.device("cuda", self.device_id)
        binding = self.session.io_binding()
        keep = []  # tensors bound by pointer must outlive the run
        for name, value in feeds.items():
            if value.is_cuda:
                value = value.detach().to(device).contiguous()
                binding.bind_input(name, "cuda", self.device_id, _NUMPY_DTYPES[value.dtype], list(value.shape),
                                   value.data_ptr())
                keep.append(value)
            else:
                binding.bind_cpu_input(name, value.detach().contiguous().numpy())
        rows = next(iter(feeds.values())).shape[0]
        outputs = []
        for meta in self.session.get_outputs():
            shape = [d if isinstance(d, int) else rows for d in meta.shape]  # a named dim is the batch
            out = torch.empty(shape, dtype=torch.float32, device=device)
            binding.bind_output(meta.name, "cuda", self.device_id, np.float32, shape, out.data_ptr())
            outputs.append(out)
        torch.cuda.synchronize(device)  # inputs written by torch kernels must be complete before ORT reads them
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


def benchmark_cuda_graph(path: str | Path, repeats: int = 50, warmup: int = 5, device_id: int = 0,
                         seed: int = 0) -> dict:
    """GPU only: per-run latency of a fixed-batch, draws-as-inputs file on ORT's CUDA provider with plain
    IOBinding vs with CUDA graph capture, on the same random pixels and draws.

    Returns dict(path, batch_size, repeats, iobinding_ms (median per run), cuda_graph_ms, speedup, the per-image
    figures, max_abs_diff between the two paths' logits, top1_agreement, providers, onnxruntime version).
    Raises SccError without a CUDA device / CUDA provider, or for a file CUDA graphs cannot take (see
    `check_cuda_graph_file`). For benchmarks/gpu_check.py:
        from scc.export.runtime import benchmark_cuda_graph
        report["ort_cuda_graph"] = benchmark_cuda_graph("ttc-b1.onnx")
    """
    ort = import_onnxruntime()
    check_cuda_graph_file(path, *_peek_inputs(Path(path)))
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SccError("benchmark_cuda_graph needs a CUDA device and onnxruntime-gpu's CUDA provider; "
                       f"here torch.cuda.is_available()={torch.cuda.is_available()}, "
                       f"providers {ort.get_available_providers()}")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    plain = OrtDefended(path, providers=providers, device_id=device_id, seed=seed)
    graph = OrtDefended(path, providers=providers, device_id=device_id, seed=seed, cuda_graph=True)
    device = torch.device("cuda", device_id)
    generator = torch.Generator().manual_seed(seed)
    b = plain.batch_size
    pixels = torch.rand((b, *plain.image_shape), generator=generator).to(device)
    draws = plain._make_draws(pixels)

    def timed(runner) -> tuple[float, torch.Tensor]:
        call = lambda: runner(pixels, draws)
        warm_up(call, device, warmup)  # the first runs of the graph session capture the graph
        seconds = time_calls(call, device, repeats)
        return summarize(seconds)["median"] * 1e3, call()

    plain_ms, plain_out = timed(plain)
    graph_ms, graph_out = timed(graph)
    return {
        "path": str(path), "batch_size": b, "repeats": repeats,
        "iobinding_ms": plain_ms, "cuda_graph_ms": graph_ms, "speedup": plain_ms / graph_ms,
        "iobinding_ms_per_image": plain_ms / b, "cuda_graph_ms_per_image": graph_ms / b,
        "max_abs_diff": (plain_out - graph_out).abs().max().item(),
        "top1_agreement": top1_agreement(plain_out, graph_out),
        "providers": graph.providers, "onnxruntime": ort.__version__,
    }

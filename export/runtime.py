"""Run an exported defense with ONNX Runtime: `OrtDefended("scc.onnx")(pixels) -> logits`.

Same contract as `scc.Defended`: float32 pixels (N, 3, S, S) in [0, 1], numpy or torch, -> torch logits (N, C)
on the input's device (validated like the eager module's: shape, dtype, NaN/Inf, range). A fixed-batch file
runs N images in chunks of its size, the last chunk padded by repeating its last image
(scc.plumbing.padded_chunks: padded rows cost compute and are dropped; every image is defended independently,
so padding never changes the other rows). Draws it makes itself follow the distributions its defense declares.

Providers: the CUDA execution provider when the installed ONNX Runtime has it and torch sees a CUDA device,
else the CPU provider; pass `providers=[...]` to choose. On CUDA, inputs and outputs go through IOBinding
(torch CUDA tensors are bound in place, no host round trip). `onnxruntime-gpu` (Linux x86_64) and plain
`onnxruntime` install the same `onnxruntime` module: with the plain one, or when the CUDA provider cannot
start, the session runs on CPU and a RuntimeWarning says so.
"""
from __future__ import annotations

import json
import secrets
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scc.models import SccError
from scc.plumbing import padded_chunks, validate_pixels

_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                 torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def import_onnxruntime():
    """onnxruntime (the onnxruntime-gpu wheel on Linux x86_64, plain onnxruntime elsewhere) or an SccError."""
    try:
        import onnxruntime
    except ImportError as err:
        from scc.env import install_hint

        raise SccError(f"ONNX Runtime is not installed ({err}); {install_hint('onnx')} "
                       "(onnxruntime-gpu on Linux x86_64, onnxruntime elsewhere)") from err
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
                      f"(providers {available}): running on CPU; install onnxruntime-gpu for the GPU",
                      RuntimeWarning, stacklevel=3)
    return ["CPUExecutionProvider"]


class OrtDefended:
    """An exported defended classifier on ONNX Runtime: `__call__(x, draws=None, trace=None) -> logits`.

    `draws` (a dict like `Defended.draws(x)`, N rows) only for files exported with draws_as_inputs; when such a
    file gets no draws they are made here per image, exactly as `scc.Defended` makes them: image b's draws from
    (seed, keys[b]) (seed=None: a fresh secret one; keys: a running index unless given), so a file and the eager
    module with the same seed and keys agree image by image. `trace`, a list, collects each step's gradient sign
    for files exported with trace_outputs (as `Defended(x, trace=[])`).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 seed: int | None = None):
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise SccError(f"ONNX file {path} does not exist; write one with `scc export onnx ... --out {path}`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        providers = list(providers) if providers is not None else default_providers(ort)
        self.session = self._load(ort, path, options, providers)
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.session.get_providers():
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
        self.draw_names = [n for n in self.inputs if n != "pixels"]
        self.seed = seed
        self._secret = secrets.randbits(63) if seed is None else int(seed)
        self.next_key = 0

    @staticmethod
    def _load(ort, path: Path, options, providers: list[str]):
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types; its message says what failed
            if providers != ["CPUExecutionProvider"] and "CPUExecutionProvider" in providers:
                warnings.warn(f"ONNX Runtime could not load {path} with {providers} ({err}); retrying on CPU",
                              RuntimeWarning, stacklevel=3)
                return OrtDefended._load(ort, path, options, ["CPUExecutionProvider"])
            raise SccError(f"ONNX Runtime could not load {path} with providers {providers}: {err}") from err

    def __repr__(self) -> str:
        return (f"OrtDefended({str(self.path)!r}, batch_size={self.batch_size}, providers={self.providers}, "
                f"draws={'inputs ' + str(self.draw_names) if self.draw_names else 'in-graph'})")

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
                           + ("; resize/crop images first (scc.data.preprocess)" if name == "pixels" else ""))
        if rows is not None and value.shape[0] != rows:
            raise SccError(f"{name}: expected {rows} rows, one per image, got {value.shape[0]}")
        if name == "pixels":  # NaN/Inf and the [0,1] range, as the eager module checks them
            validate_pixels(value)
        return value

    def _make_draws(self, pixels: torch.Tensor, keys=None) -> dict[str, torch.Tensor]:
        """Per-image draws for a file with draw inputs, from the distributions its defense declares."""
        from scc.defenses import DEFENSES
        from scc.draws import keyed_draws

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
        size = self.batch_size or n
        chunks = [[o[:rows] for o in self._run(dict(zip(feeds, part)))]
                  for _, rows, part in padded_chunks(list(feeds.values()), size)]
        outputs = [torch.cat(parts).to(pixels.device) for parts in zip(*chunks)]
        if trace is not None:
            if len(outputs) == 1:
                raise SccError(f"{self.path} has no step outputs; export with trace_outputs=True to trace")
            trace.extend(outputs[1:])
        return outputs[0]

    def _run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
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

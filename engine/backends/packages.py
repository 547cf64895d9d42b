"""AOTInductor packages: one defense x dtype x batch-bucket graph compiled ahead of time into a `.pt2` file that a
replica loads in seconds instead of compiling for minutes (torch.export + torch._inductor.aoti_compile_and_package).

    info = build_package(defended, folder, batch=1, dtype=torch.bfloat16)    # minutes, once per build (signed)
    run = load_package(defended, folder, batch=1, dtype=torch.bfloat16)      # seconds, in every replica (verified)
    logits = run(pixels, [draws[k] for k in run.inputs[1:]])                 # exactly `batch` images

`scc.backends.compiled.Engine(..., packages=folder)` loads a bucket's package when the folder has one for it and
compiles the bucket otherwise; `Engine.build_packages(folder)` writes them.

The graph is the defense's procedure traced at a fixed batch by scc.export.onnx.trace_procedure (the flat ATen
graph the ONNX export writes: forward and input-gradient ops, math attention) on the engine's classifier copy in
`dtype` (scc.precision.engine_classifier), compiled by Inductor with freezing on, so the weights are constants of
the package, pre-packed once. The weights are inside the file: its key (written beside it as `<file>.json`) names
the model, a fingerprint of the weights, the defense and its config, dtype, batch, device and the torch version; a
package is found by the hash of that key, so a package built for other weights or settings is never loaded.

A package is compiled code: loading one runs it. So, as with the service's compile-cache artifacts
(scc.backends.artifacts), build_package signs each package (`<file>.sig`: HMAC-SHA256 over the file and its `.json`
under `key_file`, else `folder/scc-cache.key`, generated 0600 on the first build), and load_package loads nothing
unless the package, its `.json` and `.sig` and every folder above them could only have been written by us (or
root), and the HMAC verifies under the same key; otherwise it raises PackageRefused, and the Engine prints that
one line and compiles the bucket instead. A package folder shipped to another host therefore needs its key shipped
by the operator too (`key_file=`, kept outside the folder), never alongside the package by whoever copies it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass, field

import torch

from ..defenses import Defended
from ..errors import SccError
from .artifacts import KEY_NAME, cache_mac_key, check_private, package_mac, write_private


class PackageRefused(SccError):
    """A package exists for these settings but is not loaded: unsigned, signed with another key, changed after it
    was signed, or in a place others could write."""
from ..precision import dtype_name, engine_classifier


def weights_fingerprint(tensors) -> str:
    """A short hash of named tensors (e.g. a module's named_parameters and named_buffers): names, shapes, dtypes,
    float64 sums and a strided sample of the values (a fraction of a second for ViT-B/32; a fingerprint, not a
    cryptographic digest of every byte)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 257)][:257].double().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{flat.double().sum().item():.17g}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def package_key(defended: Defended, batch: int, dtype: torch.dtype) -> dict:
    """What a package's graph depends on (its file name is the hash of this)."""
    clf = defended.classifier
    weights = [*clf.visual.named_parameters(), *clf.visual.named_buffers(), ("text", clf.text), ("mean", clf.mean),
               ("std", clf.std), ("logit_scale", torch.tensor(clf.logit_scale))]
    key = {"format": "scc-aoti-1", "model": clf.name, "weights": weights_fingerprint(weights),
           "spec": defended.spec, "config": repr(defended.config), "batch": batch, "dtype": dtype_name(dtype),
           "device": str(clf.text.device), "torch": torch.__version__}
    reference = getattr(clf, "tau_reference", None)
    if reference is not None:  # TTC's gate reads a fine-tuned model's frozen original: its weights are in the graph
        key["tau_reference"] = weights_fingerprint([*reference.visual.named_parameters(),
                                                    *reference.visual.named_buffers(), ("mean", reference.mean),
                                                    ("std", reference.std)])
    return key


def package_path(folder: str | os.PathLike, key: dict) -> str:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    return os.path.join(os.fspath(folder), f"scc-{key['spec']}-b{key['batch']}-{key['dtype']}-{digest}.pt2")


@dataclass
class Package:
    """A loaded package: `package(pixels, draws_in_input_order) -> logits`; `inputs` names the graph's inputs
    ("pixels", then the draw keys)."""
    path: str
    inputs: list[str]
    batch: int
    load_seconds: float
    run: object = field(repr=False)

    def __call__(self, pixels: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
        out = self.run(pixels, *draws)
        return out[0] if isinstance(out, (list, tuple)) else out


def _as_fp32(defended: Defended) -> Defended:
    return defended.with_dtype(torch.float32) if defended.dtype != torch.float32 else defended


def build_package(defended: Defended, folder: str | os.PathLike, batch: int, dtype: torch.dtype = torch.float32,
                  freeze: bool = True, key_file: str | None = None) -> dict:
    """Trace, export and AOT-compile `defended` at a fixed `batch` in `dtype` into `folder` (created 0700 if
    needed) and sign it (`<file>.sig`, see the module docstring for `key_file`); returns {"path", "seconds",
    "bytes", "key"}."""
    from ..export.onnx import trace_procedure

    defended = _as_fp32(defended)
    defended.record.require("compiled", "compiles")
    key = package_key(defended, batch, dtype)
    path = package_path(folder, key)
    os.makedirs(os.fspath(folder), mode=0o700, exist_ok=True)
    mac_key = cache_mac_key(os.fspath(folder), key_file)  # before minutes of compiling: a bad key file fails now
    start = time.perf_counter()
    engine_copy = Defended(engine_classifier(defended.classifier, dtype), defended.defense, defended.config,
                           preset=defended.preset)  # patch conv as matmul, `dtype` tower: the engine's own graph
    graph, example, names, _ = trace_procedure(engine_copy, batch_size=batch)
    exported = torch.export.export(graph, tuple(example))
    tmp = f"{path}.{os.getpid()}.tmp.pt2"
    torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs={"freezing": freeze})
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    write_private(path + ".json", json.dumps({**key, "inputs": names}, indent=1, sort_keys=True).encode())
    write_private(path + ".sig", package_mac(path, mac_key).encode())
    return {"path": path, "seconds": time.perf_counter() - start, "bytes": os.path.getsize(path), "key": key}


def find_package(defended: Defended, folder: str | os.PathLike, batch: int, dtype: torch.dtype) -> str | None:
    """The package in `folder` built for exactly this model, weights, defense, config, batch, dtype and torch."""
    path = package_path(folder, package_key(_as_fp32(defended), batch, dtype))
    return path if os.path.isfile(path) and os.path.isfile(path + ".json") else None


def verify_package(path: str, folder: str | os.PathLike, key_file: str | None = None) -> None:
    """PackageRefused unless `path` (with its .json and .sig) could only have been written by us and its HMAC
    verifies under `key_file` (else `folder/scc-cache.key`); nothing of the package is loaded here."""
    key_path = key_file or os.path.join(os.fspath(folder), KEY_NAME)
    missing = next((p for p in (path, path + ".json", path + ".sig") if not os.path.exists(p)), None)
    if missing:
        raise PackageRefused(f"package {path}: {os.path.basename(missing)} is missing, so it is not signed; "
                             "rebuild it with build_package")
    try:
        for p in (path, path + ".json", path + ".sig"):
            check_private(p, "package")
    except SccError as err:
        raise PackageRefused(str(err)) from err
    if not os.path.isfile(key_path):
        raise PackageRefused(f"package {path}: no key to check its signature ({key_path} is missing); pass the "
                             "key it was built with (key_file=) or rebuild it here")
    try:
        mac_key = cache_mac_key(os.fspath(folder), key_file)
    except SccError as err:
        raise PackageRefused(str(err)) from err
    with open(path + ".sig") as f:
        sig = f.read().strip()
    if not hmac.compare_digest(sig, package_mac(path, mac_key)):
        raise PackageRefused(f"package {path}: its HMAC does not match (changed after it was signed, or signed with "
                             "another key); rebuild it, or pass the key it was built with (key_file=)")


def load_package(defended: Defended, folder: str | os.PathLike, batch: int, dtype: torch.dtype,
                 key_file: str | None = None) -> Package:
    """Load the package `build_package` wrote for these settings after verify_package; SccError when the folder
    has none, PackageRefused when it has one that fails the checks."""
    path = find_package(defended, folder, batch, dtype)
    if path is None:
        raise SccError(f"no package in {os.fspath(folder)!r} for {defended.spec} at batch {batch} in "
                       f"{dtype_name(dtype)} with these weights and this torch ({torch.__version__}); build it with "
                       "scc.backends.packages.build_package (or Engine.build_packages)")
    return open_package(path, folder, batch, key_file)


def open_package(path: str, folder: str | os.PathLike, batch: int, key_file: str | None = None) -> Package:
    """Load the package file `path` (as find_package returns it) after verify_package."""
    verify_package(path, folder, key_file)
    with open(path + ".json") as f:
        inputs = json.load(f)["inputs"]
    start = time.perf_counter()
    run = torch._inductor.aoti_load_package(path)
    return Package(path, inputs, batch, time.perf_counter() - start, run)

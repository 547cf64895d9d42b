"""torch.compile cache artifacts: what a compiled replica compiled, saved to one file and loaded by the next replica
with the same key, so it starts warm.

    enable_compile_cache(folder)                     # Inductor's on-disk caches under `folder`
    path = artifact_path(folder, key)                # folder/scc-<hash of key>.bin
    loaded = load_compile_artifacts(path)            # before compiling: True when it existed and loaded
    save_compile_artifacts(path, key)                # after compiling: the file and path.json (the key)
"""
from __future__ import annotations

import json
import os
import sys
from typing import Mapping

import torch


def enable_compile_cache(folder: str) -> None:
    """Inductor's on-disk caches (FX graph, AOT autograd, compiled kernels) under `folder`, shared by every
    replica on the host. Inductor keys each entry by the graph, its input shapes (= the bucket), dtypes, device
    and the torch/triton versions, so one folder serves every model x defense x bucket safely."""
    import torch._inductor.config as inductor_config

    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(folder)  # read when a cache path is needed
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    inductor_config.fx_graph_cache = True  # the config module may have read the environment already
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = True


def artifact_path(folder: str, key: Mapping) -> str:
    """`folder/scc-<hash of key>.bin`: the artifact file of the replica that `key` describes."""
    import hashlib

    text = json.dumps(key, sort_keys=True, default=str)
    return os.path.join(folder, f"scc-{hashlib.blake2b(text.encode(), digest_size=12).hexdigest()}.bin")


def load_compile_artifacts(path: str) -> bool:
    """Preload torch's compile caches from one artifact file (torch.compiler.load_cache_artifacts): True when it
    existed and loaded. A replica on a host whose local caches are empty starts warm from this one file."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        blob = f.read()
    try:
        info = torch.compiler.load_cache_artifacts(blob)  # None when the bytes do not deserialize
        reason = None if info is not None else "not a torch compile-cache artifact (checksum or format)"
    except Exception as err:  # a truncated or foreign file must not stop the replica: it compiles instead
        reason = f"{type(err).__name__}: {err}"
    if reason is not None:
        print(f"scc serve: ignoring the compile-cache artifact {path} ({reason}); compiling from scratch",
              file=sys.stderr)
        return False
    return True


def save_compile_artifacts(path: str, key: Mapping) -> bool:
    """Write what this process compiled (torch.compiler.save_cache_artifacts) to `path`, atomically, and `key`
    beside it as `path.json` (what the file was built for)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for target, data in ((path + ".json", json.dumps(key, indent=2, sort_keys=True, default=str).encode()),
                         (path, saved[0])):
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return True

"""The robust testbed models: each bundled model fine-tuned by CLIP-FT, TeCoA, PMG-AFT and FARE
(scc.train.finetune), built once into a cache and reused by `scc eval`'s fine-tuned columns.

    path, meta = testbed_model("scc-tiny-digits", "fare")           # builds on first use (announced), then reads
    scc finetune --testbed digits,fashion --method all               # builds (or finds) them all up front

Each model lives in `<cache>/robust/<stem>-<key>/` (`<cache>` = $SCC_CACHE_DIR, default ~/.cache/scc). The key is
a hash of everything that determines the weights: the model and the sha256 of its bundled weights, the method and
preset with the resolved config, the training data and subset, the seed, the hash of scc/train/finetune.py and
the torch version. A changed recipe or code gets a new folder; nothing is retrained while the key matches. A build
runs on one CPU thread from a fixed seed, so the same key rebuilds the same bytes (tests/test_finetune.py checks
two runs for equality). An interrupted build resumes from its last finished epoch.

Testbeds: digits trains on the 1347 training digits; fashion on a stratified 2560-image subset of Fashion-MNIST's
55000 training images, the same order of cost as digits. That subset ships with scc (scc.data.fashion_train_subset,
rebuilt bit for bit from the Debian package dataset-fashion-mnist), so both build offline from a fresh clone. Both are
in-distribution: tuned on the testbed's training split and scored on its held-out split, unlike the paper, which
tunes on TinyImageNet and tests zero-shot on 16 other datasets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import SccError
from ..models import BUNDLED, asset_path
from .finetune import code_hash, file_sha256, make_config, method_label, parse_method, stem_of

TESTBEDS: dict[str, dict] = {
    "scc-tiny-digits": {"data": "digits", "images": None},
    "scc-tiny-fashion": {"data": "fashion", "images": 2560},
}
SEED = 0
IN_DISTRIBUTION = ("In-distribution caveat: each fine-tuned model was tuned on its testbed's training split and is "
                   "scored on the held-out split of the same dataset. The paper fine-tunes on TinyImageNet and "
                   "evaluates zero-shot on 16 other datasets, so these fine-tuned columns are favoured relative to "
                   "the paper's.")


def cache_root() -> Path:
    return Path(os.environ.get("SCC_CACHE_DIR") or Path.home() / ".cache" / "scc")


def testbed_key(model: str, method: str, preset: str, seed: int = SEED) -> dict:
    """What the testbed model's weights depend on, and its short hash."""
    if model not in TESTBEDS:
        raise SccError(f"robust testbed models exist for the bundled models ({', '.join(TESTBEDS)}), not {model!r}; "
                       f"fine-tune it with `scc finetune --model {model} --method {method} --data ...` and evaluate the "
                       "checkpoint with --pretrained PATH")
    recipe = TESTBEDS[model]
    what = {"model": model, "base_weights_sha256": file_sha256(asset_path(f"{model}.safetensors")),
            "method": method, "preset": preset,
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(make_config(method, preset)).items()},
            "data": recipe["data"], "images": recipe["images"], "seed": seed, "code_hash": code_hash(),
            "torch": torch.__version__.split("+")[0]}
    what["key"] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return what


def testbed_model(model: str, label: str, seed: int = SEED, build: bool = True, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """(checkpoint path, meta) of the testbed model `label` ('fare', 'tecoa-eps4', ...) of bundled `model`: read
    from the cache, or built into it when missing (announced through `log`); `build=False` raises instead. Two
    processes asking for one missing model build it once: the second waits for the first."""
    method, preset = parse_method(label)
    key = testbed_key(model, method, preset, seed)
    stem = stem_of(model, method, preset)
    folder = cache_root() / "robust" / f"{stem}-{key['key']}"
    weights, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.meta.json"
    if weights.is_file() and meta_path.is_file():
        return weights, json.loads(meta_path.read_text())
    if not build:
        raise SccError(f"the robust model {method_label(method, preset)} of {model} is not built yet; run `scc finetune "
                       f"--testbed {BUNDLED[model]} --method {method_label(method, preset)}`")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".building", "a+") as guard:  # one builder per folder: another process waits, then reads
        import fcntl

        fcntl.lockf(guard, fcntl.LOCK_EX)
        if weights.is_file() and meta_path.is_file():
            return weights, json.loads(meta_path.read_text())
        return _build(model, method, preset, seed, key, folder, stem, progress, log)


def _build(model, method, preset, seed, key, folder, stem, progress, log) -> tuple[Path, dict]:
    from .finetune import finetune

    weights, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.meta.json"
    say = log or (lambda line: None)
    say(f"building the robust testbed model {stem} (once; cached in {folder})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same bytes on every rebuild
    try:
        recipe = TESTBEDS[model]
        meta = finetune(model, method, preset, data=recipe["data"], images=recipe["images"], out=folder, seed=seed,
                        progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)
    meta["cache_key"] = key
    meta_path.write_text(json.dumps(meta, indent=2))
    return weights, meta


def provenance(meta: dict, path: Path | str) -> dict:
    """The fields of a fine-tuned model's meta that a report carries."""
    keys = ("model", "method", "label", "preset", "source", "eps", "eps_255", "attack_steps", "data",
            "data_description", "n_images", "seed", "global_batch", "optimizer_steps", "train_s",
            "code_hash", "checkpoint_sha256")
    out = {k: meta.get(k) for k in keys if k in meta}
    out["config"] = meta.get("config")
    out["epochs"] = [{k: v for k, v in e.items() if k != "lr_end"} for e in meta.get("epochs", [])]
    out["checkpoint"] = str(path)
    if "cache_key" in meta:
        out["cache_key"] = meta["cache_key"]["key"]
    return out

"""The robust testbed models: each bundled model fine-tuned by CLIP-FT, TeCoA, PMG-AFT and FARE
(scc.train.finetune), built once into a cache and reused by `scc eval`'s fine-tuned columns.

    path, meta = testbed_model("scc-tiny-digits", "fare")           # builds on first use (announced), then reads
    scc finetune --testbed digits,fashion --method all               # builds (or finds) them all up front

Each model lives in `<cache>/robust/<stem>-<key>/` (`<cache>` = $SCC_CACHE_DIR, default ~/.cache/scc). The key is
a hash of everything that determines the weights:
- the recipe: the model, the method and preset with the resolved config, the data spec and subset, the seed;
- what the run starts from, hashed as tensors built by the same functions the run uses (finetune.starting_point):
  the training pixels and labels in their order (so scc.data, the stratified split and the preprocessing are
  covered) and the initial model (every tensor of the CLIP, the class text embeddings, the logit scale, the
  normalisation), plus the sha256 of the bundled weights and of the architecture config;
- the code the training loop runs: the source of scc.train.finetune, scc.perturbation and scc.draws
  (finetune.TRAINING_MODULES);
- the libraries that compute or write the weights (torch, open_clip, numpy, safetensors) and the CPU kernels torch
  dispatches to.
A change to any of them gets a new folder; nothing is retrained while the key matches. A build runs on one CPU
thread from a fixed seed, so the same key rebuilds the same bytes (tests/test_finetune.py checks two runs for
equality). An interrupted build resumes from its last finished epoch.

The cache holds files that scc loads, so a folder of it that another user can write (the cache folder, robust/, a
model's folder, or a file read from it) is refused with one line naming it; so is a folder above the cache that
others can write (but a sticky one such as /tmp). Folders scc creates are private (mode 0700). Every file is
written under a temporary name and moved into place whole, so the readers that do not take the builder's lock see
a whole file or none.

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
import stat
from pathlib import Path
from typing import Callable

import torch

from ..errors import SccError
from ..models import BUNDLED, asset_path
from .finetune import (_jsonable, code_hash, file_sha256, library_versions, make_config, method_label,
                       parse_method, starting_point, stem_of)

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


def _why_unsafe(st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (uid, 0):
        return f"owned by uid {st.st_uid}, not by you (uid {uid}) or root"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & stat.S_IWOTH:
        return f"writable by every user (mode {mode:04o})"
    if st.st_mode & stat.S_IWGRP:
        return f"writable by its group (mode {mode:04o})"
    return None


def check_cache_path(path: Path) -> None:
    """SccError unless only we (or root) can write `path` (a folder of the robust-model cache or a file read from
    it), with one line naming it and the fix. The folders above it may also be sticky (/tmp), where others
    cannot replace what we own."""
    uid = os.getuid()
    st = os.stat(path)  # a symbolic link: what it points to (the folder holding the link is checked below)
    why = _why_unsafe(st, uid)
    if why:
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "file"
        raise SccError(f"the scc cache {kind} {path} is {why}: another user could plant a model or a file that runs "
                       f"code when scc reads it; run `chmod go-w {path}` if it is yours, or set SCC_CACHE_DIR to a "
                       "folder of your own")
    above = {*Path(os.path.abspath(path)).parents, *Path(os.path.realpath(path)).parents}
    for parent in sorted(above, key=lambda p: len(p.parts)):
        st = os.stat(parent)
        why = _why_unsafe(st, uid)
        if why and not (st.st_mode & stat.S_ISVTX and st.st_uid in (uid, 0)):
            raise SccError(f"the folder {parent} above the scc cache {path} is {why}, so another user could "
                           "replace the cache; set SCC_CACHE_DIR to a folder whose parents only you or root can "
                           "write")


def _private_folder(folder: Path, create: bool) -> bool:
    """Check `folder` (created private when absent and `create`); whether it exists."""
    if not folder.exists():
        if not create:
            return False
        os.makedirs(folder, mode=0o700, exist_ok=True)
    check_cache_path(folder)
    return True


def testbed_key(model: str, method: str, preset: str, seed: int = SEED) -> dict:
    """What the testbed model's weights depend on, and its short hash (see the module's docstring). Builds the
    training set and loads the model to hash them, as the build would."""
    if model not in TESTBEDS:
        raise SccError(f"robust testbed models exist for the bundled models ({', '.join(TESTBEDS)}), not {model!r}; "
                       f"fine-tune it with `scc finetune --model {model} --method {method} --data ...` and evaluate the "
                       "checkpoint with --pretrained PATH")
    recipe = TESTBEDS[model]
    what = {"model": model, "base_weights_sha256": file_sha256(asset_path(f"{model}.safetensors")),
            "base_config_sha256": file_sha256(asset_path(f"{model}.json")),
            "method": method, "preset": preset,
            "config": _jsonable(dataclasses.asdict(make_config(method, preset))),
            "data": recipe["data"], "images": recipe["images"], "seed": seed,
            **starting_point(model, recipe["data"], None, recipe["images"], seed),
            "code_hash": code_hash(), "libraries": library_versions()}
    what["key"] = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return what


def testbed_model(model: str, label: str, seed: int = SEED, build: bool = True, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """(checkpoint path, meta) of the testbed model `label` ('fare', 'tecoa-eps4', ...) of bundled `model`: read
    from the cache, or built into it when missing (announced through `log`); `build=False` raises instead. Two
    processes asking for one missing model build it once: the second waits for the first. A cache folder other
    users can write is refused before anything in it is read (check_cache_path)."""
    method, preset = parse_method(label)
    root = cache_root()
    for folder in (root, root / "robust"):
        _private_folder(folder, create=build)
    key = testbed_key(model, method, preset, seed)
    stem = stem_of(model, method, preset)
    folder = root / "robust" / f"{stem}-{key['key']}"
    weights, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.meta.json"
    if _private_folder(folder, create=False) and _ready(weights, meta_path):
        return weights, json.loads(meta_path.read_text())
    if not build:
        raise SccError(f"the robust model {method_label(method, preset)} of {model} is not built yet; run `scc finetune "
                       f"--testbed {BUNDLED[model]} --method {method_label(method, preset)}`")
    _private_folder(folder, create=True)
    with open(folder / ".building", "a+") as guard:  # one builder per folder: another process waits, then reads
        import fcntl

        fcntl.lockf(guard, fcntl.LOCK_EX)
        if _ready(weights, meta_path):
            return weights, json.loads(meta_path.read_text())
        resume = folder / f"{stem}.resume.pt"
        if resume.exists():
            check_cache_path(resume)
        return _build(model, method, preset, seed, key, folder, stem, progress, log)


def _ready(weights: Path, meta_path: Path) -> bool:
    """Both files there (each was moved into place whole, the meta last) and private."""
    if not (weights.is_file() and meta_path.is_file()):
        return False
    check_cache_path(weights)
    check_cache_path(meta_path)
    return True


def _build(model, method, preset, seed, key, folder, stem, progress, log) -> tuple[Path, dict]:
    from .finetune import finetune

    say = log or (lambda line: None)
    say(f"building the robust testbed model {stem} (once; cached in {folder})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same bytes on every rebuild
    try:
        recipe = TESTBEDS[model]
        meta = finetune(model, method, preset, data=recipe["data"], images=recipe["images"], out=folder, seed=seed,
                        progress=progress, log=log, meta_extra={"cache_key": key})
    finally:
        torch.set_num_threads(threads)
    return folder / f"{stem}.safetensors", meta


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

"""torch.compile cache artifacts: what a compiled replica compiled, saved to one file and loaded by the next replica
with the same key, so it starts warm; and the checks that keep the cache from being a code-injection path.

    check_cache_folder(folder)                       # SccError unless only we (or root) could have written it
    enable_compile_cache(folder)                     # Inductor's on-disk caches under `folder` (checked first)
    mac_key = cache_mac_key(folder, key_file=None)   # the HMAC key: key_file, or folder/scc-cache.key (made 0600)
    path = artifact_path(folder, key)                # folder/scc-<hash of key>.bin
    status = load_compile_artifacts(path, mac_key)   # "loaded" | "absent" | "refused: <reason>" (never loaded then)
    save_compile_artifacts(path, key, mac_key)       # the file, path.sig (its HMAC) and path.json (the key)

Threat model. A compile artifact and Inductor's cache entries are pickled code and compiled kernels: loading one runs
it. So (1) the folder, every folder above it and every entry in it must be writable only by us (owner us, or root
for the folders above; no group/other write bit, except a sticky folder such as /tmp above it, where others cannot
replace our entries), the way ssh treats ~/.ssh; and (2) each artifact file carries an HMAC-SHA256 (`.sig`) under a
key only the operator holds: `--cache-key-file`, or a key generated on first start into `folder/scc-cache.key`
(mode 0600). An artifact copied from another host is therefore refused unless that host's key came with it, and one
changed after it was signed is refused; either case is one line on stderr, and the replica compiles instead.
Inductor's own cache entries cannot be signed (Inductor loads them itself): they are covered by (1) only.
AOTInductor packages (scc.backends.packages) are code too and get the same two checks: package_mac signs the
`.pt2` with its `.json`, under the same kind of key (`key_file`, or `folder/scc-cache.key` of the package folder).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
from typing import Mapping

import torch

from ..errors import SccError

KEY_NAME = "scc-cache.key"
MAC_CONTEXT = b"scc-compile-artifact-v1\0"


def _writable_by_others(st: os.stat_result) -> str | None:
    """Why another user could write this entry (None when nobody but its owner can)."""
    if st.st_mode & stat.S_IWOTH:
        return f"writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP:
        return f"writable by its group (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_private(path: str, what: str = "--compile-cache", secret: bool = False) -> None:
    """SccError unless `path` and every folder above it could only have been written by us (or root).

    `path` itself must be owned by us, not a symlink, and have no group/other write bit (no group/other read bit
    either when `secret`, e.g. a key). A folder above it must be owned by us or root and not group/other-writable,
    unless it is a sticky folder (/tmp), where others cannot replace what we own."""
    uid = os.getuid()
    full = os.path.abspath(path)
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        raise SccError(f"{what} {path}: a symbolic link; refusing it (point at the real path)")
    if st.st_uid != uid:
        raise SccError(f"{what} {path}: owned by uid {st.st_uid}, not by us (uid {uid}); anyone who can write it "
                       "can inject code into the replicas: use a folder of your own")
    why = _writable_by_others(st)
    if why:
        raise SccError(f"{what} {path}: {why}; anyone who can write it can inject code into the replicas: "
                       f"chmod go-w {path}")
    if secret and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        raise SccError(f"{what} {path}: readable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                       f"chmod 600 {path}")
    parent = os.path.dirname(full)
    while True:
        st = os.stat(parent)
        if st.st_uid not in (uid, 0):
            raise SccError(f"{what} {path}: the folder {parent} above it is owned by uid {st.st_uid}, who could "
                           "replace it; use a folder whose parents belong to you or root")
        why = _writable_by_others(st)
        if why and not st.st_mode & stat.S_ISVTX:
            raise SccError(f"{what} {path}: the folder {parent} above it is {why}, so others could replace it; "
                           "use a folder whose parents only you or root can write")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def check_cache_folder(folder: str, create: bool = True) -> None:
    """SccError unless the cache folder and everything in it could only have been written by us (created 0700
    when absent and `create`)."""
    if create and not os.path.exists(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    if not os.path.isdir(folder):
        raise SccError(f"--compile-cache {folder}: not a folder")
    check_private(folder)
    uid = os.getuid()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            why = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                   f"owned by uid {st.st_uid}, not us" if st.st_uid != uid else _writable_by_others(st))
            if why:
                raise SccError(f"--compile-cache {folder}: {p} is {why}; anyone who could write it can inject code "
                               "into the replicas: remove it or use a fresh folder")


def enable_compile_cache(folder: str) -> None:
    """Inductor's on-disk caches (FX graph, AOT autograd, compiled kernels) under `folder`, shared by every
    replica on the host, after check_cache_folder. Inductor keys each entry by the graph, its input shapes (= the
    bucket), dtypes, device and the torch/triton versions, so one folder serves every model x defense x bucket."""
    import torch._inductor.config as inductor_config

    check_cache_folder(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(folder)  # read when a cache path is needed
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    inductor_config.fx_graph_cache = True  # the config module may have read the environment already
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = True


def cache_mac_key(folder: str, key_file: str | None = None) -> bytes:
    """The artifacts' HMAC key: the operator's `key_file` (must exist, ours, mode 0600), else `folder/scc-cache.key`,
    generated (32 random bytes, hex, mode 0600) by the first replica that finds none."""
    path = key_file or os.path.join(folder, KEY_NAME)
    what = "--cache-key-file" if key_file else "the compile-cache key"
    if not os.path.exists(path):
        if key_file:
            raise SccError(f"--cache-key-file {key_file}: no such file (make one: "
                           f"python -c 'import secrets; print(secrets.token_hex(32))' > {key_file}; chmod 600 {key_file})")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # atomic: two replicas starting together keep the first key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    check_private(path, what, secret=True)
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 32:
        raise SccError(f"{what} {path}: {len(key)} bytes; a key needs at least 32 (e.g. secrets.token_hex(32))")
    return key


def artifact_path(folder: str, key: Mapping) -> str:
    """`folder/scc-<hash of key>.bin`: the artifact file of the replica that `key` describes."""
    text = json.dumps(key, sort_keys=True, default=str)
    return os.path.join(folder, f"scc-{hashlib.blake2b(text.encode(), digest_size=12).hexdigest()}.bin")


def artifact_mac(blob: bytes, path: str, mac_key: bytes) -> str:
    """HMAC-SHA256 over the artifact's bytes and its file name (a valid artifact of another configuration renamed to
    this one's name does not verify)."""
    msg = MAC_CONTEXT + os.path.basename(path).encode() + b"\0" + blob
    return hmac.new(mac_key, msg, hashlib.sha256).hexdigest()


PACKAGE_CONTEXT = b"scc-aoti-package-v1\0"


def package_mac(path: str, mac_key: bytes) -> str:
    """HMAC-SHA256 over an AOTInductor package: its file name, its key file (`path.json`, which names the graph's
    inputs) and its bytes, read in 8 MB pieces (a ViT-B/32 package is ~180 MB)."""
    mac = hmac.new(mac_key, PACKAGE_CONTEXT + os.path.basename(path).encode() + b"\0", hashlib.sha256)
    with open(path + ".json", "rb") as f:
        meta = f.read()
    mac.update(len(meta).to_bytes(8, "little") + meta)
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(8 << 20), b""):
            mac.update(piece)
    return mac.hexdigest()


def _refuse(path: str, reason: str) -> str:
    print(f"scc serve: refusing the compile-cache artifact {path} ({reason}); compiling from scratch", file=sys.stderr)
    return f"refused: {reason}"


def load_compile_artifacts(path: str, mac_key: bytes) -> str:
    """Preload torch's compile caches from one artifact file (torch.compiler.load_cache_artifacts) after checking
    who could have written it and its HMAC: "loaded", "absent", or "refused: <reason>" (one stderr line; nothing of
    the file is deserialized then). A replica whose local caches are empty starts warm from this one file."""
    if not os.path.isfile(path):
        return "absent"
    try:
        check_private(path, "artifact")
    except SccError as err:
        return _refuse(path, str(err).split(": ", 1)[-1])
    with open(path, "rb") as f:
        blob = f.read()
    try:
        with open(path + ".sig") as f:
            sig = f.read().strip()
    except OSError:
        return _refuse(path, "no .sig file: not signed with this cache's key")
    if not hmac.compare_digest(sig, artifact_mac(blob, path, mac_key)):
        return _refuse(path, "its HMAC does not match: changed after it was signed, or signed with another key")
    try:
        info = torch.compiler.load_cache_artifacts(blob)  # None when the bytes do not deserialize
    except Exception as err:  # an authentic but unusable file (another torch) must not stop the replica
        return _refuse(path, f"{type(err).__name__}: {err}")
    if info is None:
        return _refuse(path, "not a torch compile-cache artifact (checksum or format)")
    return "loaded"


def save_compile_artifacts(path: str, key: Mapping, mac_key: bytes) -> bool:
    """Write what this process compiled (torch.compiler.save_cache_artifacts) to `path`, its HMAC to `path.sig` and
    `key` to `path.json` (what the file was built for), each atomically and mode 0600."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return False
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    blob = saved[0]
    write_private(path + ".json", json.dumps(key, indent=2, sort_keys=True, default=str).encode())
    write_private(path, blob)
    write_private(path + ".sig", artifact_mac(blob, path, mac_key).encode())
    return True


def write_private(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary file renamed over it), mode 0600."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

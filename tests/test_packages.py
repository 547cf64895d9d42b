"""AOTInductor packages (scc.backends.packages): a replica loads a bucket's graph from a shipped file instead of
compiling it. Building one takes minutes of C++ compilation here, so the build + load test is slow; the default
suite checks what decides whether a package is loaded at all."""
import pytest
import torch

import scc
from scc.backends.compiled import Engine
from scc.backends.packages import find_package, load_package, package_key, package_path
from scc.errors import SccError


def test_package_key_names_everything_the_graph_depends_on(tiny):
    ttc = scc.defend(tiny, "ttc", seed=0)
    key = package_key(ttc, 2, torch.bfloat16)
    assert (key["spec"], key["batch"], key["dtype"], key["torch"]) == ("ttc", 2, "bf16", torch.__version__)
    assert package_key(scc.defend(tiny, "ttc", seed=5), 2, torch.bfloat16) == key  # draws are inputs: seed-free
    others = [package_key(ttc, 1, torch.bfloat16), package_key(ttc, 2, torch.float32),
              package_key(scc.defend(tiny, "ttc", steps=1), 2, torch.bfloat16),
              package_key(scc.defend(tiny, "scc-latency"), 2, torch.bfloat16)]
    changed = scc.load("scc-tiny-digits")
    with torch.no_grad():
        changed.visual.transformer.resblocks[0].mlp.c_fc.weight[0, 0] += 1e-3  # one weight moved
    others.append(package_key(scc.defend(changed, "ttc"), 2, torch.bfloat16))
    paths = {package_path("f", k) for k in [key, *others]}
    assert len(paths) == len(others) + 1, "two different graphs would share a package file"


def test_missing_package_is_a_clear_error_and_the_engine_compiles_instead(tiny, tmp_path):
    ttc = scc.defend(tiny, "ttc", seed=0, steps=1)
    assert find_package(ttc, tmp_path, 1, torch.float32) is None
    with pytest.raises(SccError, match=r"no package in .* for ttc at batch 1 in fp32 .*build_package"):
        load_package(ttc, tmp_path, 1, torch.float32)
    with pytest.raises(SccError, match="use them with backend='compiled' and mode=None"):
        Engine(ttc, backend="triton", packages=str(tmp_path))


@pytest.mark.slow
def test_engine_loads_a_built_package(tiny, digits, tmp_path):
    """Build the bf16 bucket-2 package of scc-latency, then a second engine loads it (no compile) and answers as
    the eager bf16 module does on the same draws, per chunk (5 images: 2 + 2 + 1 padded)."""
    x = digits[0][:5]
    defended = scc.defend(tiny, "scc-latency", seed=0)
    draws = defended.draws(x)
    info = Engine(defended, max_batch=2, dtype=torch.bfloat16).build_packages(str(tmp_path), [2])
    assert info[0]["bytes"] > 0 and find_package(defended, tmp_path, 2, torch.bfloat16) == info[0]["path"]
    engine = Engine(defended, max_batch=2, dtype=torch.bfloat16, packages=str(tmp_path))
    engine.warmup(2)
    assert engine.loaded_packages == {2: info[0]["path"]} and engine.compile_seconds[2] < 5
    out = engine(x, draws)
    with torch.no_grad():
        ref = defended.with_dtype(torch.bfloat16)(x, draws)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, atol=0.5, rtol=0)


# ---- a package is code: it is loaded only when signed under our key and nobody else could have written it ----
def _fake_package(defended, folder, batch=1, dtype=torch.float32, sign=True, key_file=None):
    """The files build_package writes (a stand-in .pt2; aoti_load_package is replaced in these tests), signed the
    way build_package signs."""
    import json
    import os

    from scc.backends.artifacts import cache_mac_key, package_mac

    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = package_path(folder, package_key(defended, batch, dtype))
    for name, data in ((path, b"compiled code"), (path + ".json", json.dumps({"inputs": ["pixels"]}).encode())):
        with open(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(data)
    if sign:
        with open(os.open(path + ".sig", os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(package_mac(path, cache_mac_key(str(folder), key_file)))
    return path


@pytest.fixture
def loader(monkeypatch):
    """Replaces torch._inductor.aoti_load_package; records what it was asked to load."""
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path: loaded.append(path) or (lambda x, *draws: x.flatten(1)[:, :3]))
    return loaded


def test_a_signed_private_package_is_loaded(tiny, tmp_path, loader):
    ttc = scc.defend(tiny, "ttc", seed=0, steps=1)
    path = _fake_package(ttc, tmp_path / "pk")
    package = load_package(ttc, tmp_path / "pk", 1, torch.float32)
    assert loader == [path] and package.inputs == ["pixels"]


@pytest.mark.parametrize("harm, reason", [
    ("unsigned", r"scc-ttc-b1-fp32-\w+\.pt2\.sig is missing, so it is not signed"),
    ("tampered", "its HMAC does not match"),
    ("tampered-json", "its HMAC does not match"),
    ("other-key", "its HMAC does not match"),
    ("no-key", r"no key to check its signature \(.*scc-cache.key is missing\)"),
    ("group-writable", r"writable by its group \(mode 0620\); .*chmod go-w"),
    ("folder-writable", r"the folder .*pk above it is writable by every user"),
])
def test_a_package_that_fails_a_check_is_refused_before_anything_loads(tiny, tmp_path, loader, harm, reason):
    from scc.backends.packages import PackageRefused

    ttc = scc.defend(tiny, "ttc", seed=0, steps=1)
    folder = tmp_path / "pk"
    path = _fake_package(ttc, folder, sign=harm != "unsigned")
    key_file = None
    if harm == "tampered":
        with open(path, "ab") as f:
            f.write(b" and more")
    elif harm == "tampered-json":
        with open(path + ".json", "w") as f:
            f.write('{"inputs": ["pixels", "x"]}')
    elif harm == "other-key":
        key_file = tmp_path / "operator.key"
        key_file.write_text("ab" * 32)
        key_file.chmod(0o600)
    elif harm == "no-key":
        (folder / "scc-cache.key").unlink()
    elif harm == "group-writable":
        (folder / path.rsplit("/", 1)[1]).chmod(0o620)
    elif harm == "folder-writable":
        folder.chmod(0o777)
    with pytest.raises(PackageRefused, match=reason):
        load_package(ttc, folder, 1, torch.float32, key_file=None if key_file is None else str(key_file))
    assert loader == [], "a refused package reached the loader"


def test_the_engine_compiles_a_bucket_whose_package_is_refused(tiny, tmp_path, loader, monkeypatch, capsys):
    """One stderr line naming the reason, no load, and the bucket compiles (the compile itself is stubbed here: the
    slow test above runs a real one)."""
    ttc = scc.defend(tiny, "ttc", seed=0, steps=1)
    path = _fake_package(ttc, tmp_path / "pk")
    with open(path, "ab") as f:
        f.write(b"!")
    compiled = []
    monkeypatch.setattr(Engine, "_run", lambda self, bucket, traced, x, args: compiled.append(bucket))
    engine = Engine(ttc, max_batch=1, packages=str(tmp_path / "pk"))
    engine.warmup(1)
    assert loader == [] and compiled == [1] and engine.loaded_packages == {}
    assert "its HMAC does not match" in engine.refused_packages[1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scc: not loading an AOTInductor package: package ")
    assert err[0].endswith("compiling bucket 1 instead")

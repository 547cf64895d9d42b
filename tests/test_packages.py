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
    assert (key["defense"], key["batch"], key["dtype"], key["torch"]) == ("ttc", 2, "bf16", torch.__version__)
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

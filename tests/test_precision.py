"""Reduced precision (bf16 image tower; perturbation, steps, losses and logits fp32) against fp32 on identical
draws. Tolerances are relative to fp32's own run-to-run error: the defense's randomness. Precision may change
no more answers, and no more step signs, than redrawing the defense's random draws (a fresh seed) changes."""
import pytest
import torch

import scc
from scc.attacks import pgd
from scc.backends import make_runner
from scc.errors import SccError


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def attacked(tiny, digits):
    x, y = digits
    return x, y, pgd(tiny, x, y, eps=4 / 255, alpha=1 / 255, steps=10, generator=torch.Generator().manual_seed(0))


def run(defended, x, keys):
    trace = []
    with torch.no_grad():
        logits = defended(x, defended.draws(x, keys), trace=trace)
    return logits.argmax(1), trace


@pytest.mark.parametrize("spec", ["ttc", "scc-latency"])
def test_bf16_fidelity_on_heldout_digits(tiny, attacked, spec):
    """All 450 held-out digits, clean and PGD-10 4/255: bf16 vs fp32 on the same draws, and fp32 vs fp32 with a
    fresh seed as the yardstick."""
    x, y, x_adv = attacked
    keys = list(range(len(y)))
    fp32, fresh = scc.defend(tiny, spec, seed=0), scc.defend(tiny, spec, seed=1)
    bf16 = fp32.with_dtype(torch.bfloat16)
    report = []
    for images, what in ((x, "clean"), (x_adv, "PGD-10 4/255")):
        (p32, t32), (p16, t16), (pf, tf) = run(fp32, images, keys), run(bf16, images, keys), run(fresh, images, keys)
        flips, fresh_flips = (p16 != p32).float().mean().item(), (pf != p32).float().mean().item()
        signs = [(a == b).float().mean().item() for a, b in zip(t16, t32)]
        fresh_signs = [(a == b).float().mean().item() for a, b in zip(tf, t32)]
        acc32, acc16, accf = [(p == y).float().mean().item() for p in (p32, p16, pf)]
        report.append(f"{spec} {what}: acc fp32 {acc32:.3f} bf16 {acc16:.3f} (fresh seed {accf:.3f}); top-1 changed "
                      f"{flips:.3f} (fresh seed {fresh_flips:.3f}); step signs {[round(s, 3) for s in signs]} "
                      f"(fresh seed {[round(s, 3) for s in fresh_signs]})")
        assert flips <= fresh_flips, report[-1]
        assert all(s >= f for s, f in zip(signs, fresh_signs)), report[-1]
        assert abs(acc16 - acc32) <= max(0.02, abs(accf - acc32)) + 1e-9, report[-1]
    print("\n".join(report))


def test_compiled_bf16_matches_eager_bf16(tiny, digits):
    """The compiled engine's bf16 graph against the eager bf16 module (the same converted tower) on the same draws."""
    x = digits[0][:6]
    defended = scc.defend(tiny, "ttc", seed=2, steps=1)
    draws = defended.draws(x)
    runner = make_runner(defended, "compiled", 2, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = defended.with_dtype(torch.bfloat16)(x, draws)
        compiled = runner(x, draws)
    assert torch.equal(compiled.argmax(1), eager.argmax(1)), (compiled, eager)
    assert compiled.dtype == torch.float32  # the logits stay fp32


def test_reduced_copy_leaves_the_fp32_model_alone(tiny):
    bf16 = scc.defend(tiny, "scc", dtype=torch.bfloat16, seed=0)
    visual = bf16.classifier.visual
    assert not visual.cast_input and visual.visual.conv1.stem.weight.dtype == torch.float32  # fp32 patch stem
    assert visual.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    assert bf16.with_dtype(torch.float32).classifier is tiny
    x = torch.rand(2, 3, 32, 32)
    assert bf16(x).dtype == torch.float32


def test_fp16_on_a_cpu_without_native_fp16_is_refused(tiny):
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "avx512_fp16" in flags or "amx_fp16" in flags:
        pytest.skip("this CPU has native fp16 matmuls")
    with pytest.raises(SccError, match="fp16 on this CPU has no native matmul.*use --dtype bf16"):
        scc.defend(tiny, "ttc", dtype=torch.float16)


@pytest.mark.slow
def test_bf16_vit_b32_random_weights():
    """ViT-B/32 (random weights): bf16 TTC agrees with fp32 on identical draws, top-1 and per-step signs."""
    clf = scc.load("ViT-B-32", None, ["cat", "dog", "car", "tree", "house"])
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fp32, fresh = scc.defend(clf, "ttc", seed=0), scc.defend(clf, "ttc", seed=1)
    keys = list(range(4))
    (p32, t32), (p16, t16), (_, tf) = run(fp32, x, keys), run(fp32.with_dtype(torch.bfloat16), x, keys), \
        run(fresh, x, keys)
    signs = [(a == b).float().mean().item() for a, b in zip(t16, t32)]
    fresh_signs = [(a == b).float().mean().item() for a, b in zip(tf, t32)]
    assert all(s >= f for s, f in zip(signs, fresh_signs)), (signs, fresh_signs)
    assert (p16 == p32).float().mean().item() >= 0.75, (p16, p32)

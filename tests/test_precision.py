"""Reduced precision (bf16 image tower; perturbation, steps, losses and logits fp32) against fp32 on identical
draws. Tolerances are relative to fp32's own run-to-run error: the defense's randomness. Precision may change
no more answers, and no more step signs, than redrawing the defense's random draws (a fresh seed) changes."""
import json

import pytest
import torch
from PIL import Image

import scc
from scc.attacks import pgd
from scc.backends import make_runner
from scc.cli import main
from scc.errors import SccError
from scc.precision import check_dtype_on_device, resolve_dtype


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


@pytest.mark.compile
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


def test_fp16_on_a_cpu_without_native_fp16_is_refused(tiny, monkeypatch):
    monkeypatch.setattr(scc.provenance, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    with pytest.raises(SccError, match=r"fp16 on this CPU has no native matmul.*use --dtype bf16 \(or fp32\)"):
        scc.defend(tiny, "ttc", dtype=torch.float16)


def test_fp16_refusal_suggests_fp32_where_bf16_is_slow_too(tiny, cpu_without_native_bf16):
    with pytest.raises(SccError, match="fp16 on this CPU has no native matmul.*use --dtype fp32 on CPU"):
        scc.defend(tiny, "ttc", dtype=torch.float16)


# ----------------------------------------------------------------------------------------------------------
# bf16 on a CPU without native bf16 matmuls: one warning line, auto picks fp32, reports carry the CPU flags
# ----------------------------------------------------------------------------------------------------------
def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("scc: warning: bf16")]


def digit_png(digits, folder) -> str:
    path = folder / "digit.png"
    Image.fromarray((digits[0][0].permute(1, 2, 0) * 255).byte().numpy()).save(path)
    return str(path)


def test_bf16_on_an_avx2_only_cpu_warns_once_and_still_runs(tiny, digits, cpu_without_native_bf16, capsys):
    bf16 = scc.defend(tiny, "ttc", seed=0, dtype=torch.bfloat16)
    scc.defend(tiny, "scc-latency", dtype=torch.bfloat16)
    check_dtype_on_device(torch.bfloat16, "cpu")
    make_runner(scc.defend(tiny, "ttc", seed=0), "eager", 2, dtype=torch.bfloat16)
    lines = warnings_in(capsys.readouterr().err)
    assert lines == [
        "scc: warning: bf16 on this CPU (" + scc.provenance.cpu_name() + ": avx2; no avx512_bf16/amx_bf16) has no "
        "native bf16 matmul and runs ~30x slower than fp32 (measured on AVX2 only, ViT-B-32 TTC: 21.9 s vs 0.70 s "
        "per image); use --dtype fp32 or auto (dtype=torch.float32 in Python)"], lines
    assert bf16(digits[0][:2]).dtype == torch.float32  # slow, not refused


def test_bf16_cli_run_prints_one_warning_line(cpu_without_native_bf16, digits, tmp_path, capsys):
    assert main(["classify", digit_png(digits, tmp_path), "--defense", "ttc", "--dtype", "bf16", "--json",
                 str(tmp_path / "r.json")]) == 0
    assert len(warnings_in(capsys.readouterr().err)) == 1


def test_bf16_on_a_native_cpu_is_silent(tiny, monkeypatch, capsys):
    for flags in ({"avx2", "avx512f", "avx512_bf16"}, {"avx2", "avx512f", "amx_tile", "amx_bf16"}):
        monkeypatch.setattr(scc.provenance, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.delenv("SCC_BF16_WARNED", raising=False)
        scc.defend(tiny, "ttc", dtype=torch.bfloat16)
        assert warnings_in(capsys.readouterr().err) == [], flags


@pytest.mark.usefixtures("requires_native_bf16")
def test_this_cpus_own_flags_give_native_bf16(tiny, monkeypatch, capsys):
    """Unpatched: the flags this machine reports (torch's cpuid, or /proc/cpuinfo) say native bf16."""
    monkeypatch.delenv("SCC_BF16_WARNED", raising=False)
    assert scc.provenance.cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"}
    scc.defend(tiny, "ttc", dtype=torch.bfloat16)
    assert warnings_in(capsys.readouterr().err) == []


def test_cpu_flags_from_proc_cpuinfo_where_torch_has_no_capability_query(monkeypatch):
    from pathlib import Path

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo here")
    from_torch = scc.provenance.cpu_flags()
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    scc.provenance.cpu_flags.cache_clear()
    try:
        assert scc.provenance.cpu_flags() == from_torch  # both name the flags as /proc/cpuinfo does
    finally:
        scc.provenance.cpu_flags.cache_clear()


def test_auto_never_picks_a_slow_dtype(cpu_without_native_bf16, monkeypatch, capsys):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert warnings_in(capsys.readouterr().err) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, dtype in (((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert resolve_dtype("auto", "cuda") == dtype, capability  # bf16 only on a GPU with native bf16


def report_of(kind: str, tmp_path, digits) -> dict:
    out = tmp_path / f"{kind}.json"
    argv = {"classify": ["classify", digit_png(digits, tmp_path), "--defense", "none"],
            "demo": ["demo", "--images", "2", "--defenses", "none"],
            "eval-adaptive": ["eval", "--protocol", "adaptive", "--defenses", "none", "--attacks", "square",
                              "--queries", "2", "--images", "2", "--eps", "4/255", "--workers", "1"],
            "bench": ["bench", "--images", "1", "--defenses", "none", "--repeats", "1"]}[kind]
    assert main([*argv, "--quiet", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["classify", "demo", "eval-adaptive", "bench"])
def test_every_report_records_the_cpu_flags_beside_its_name(kind, cpu_without_native_bf16, digits, tmp_path):
    hardware = report_of(kind, tmp_path, digits)["hardware"]
    assert hardware["cpu"] == scc.provenance.cpu_name()
    assert (hardware["cpu_flags"], hardware["native_bf16"]) == (["avx2"], False), hardware


def test_hardware_block_names_the_flags_that_decide_bf16_speed():
    """Every other writer (benchmark rows, benchmarks/*.py, the load test's client) records scc.provenance.hardware."""
    hardware = scc.provenance.hardware("cpu")
    assert set(hardware["cpu_flags"]) <= set(scc.provenance.CPU_FLAGS)
    assert hardware["native_bf16"] == bool({"avx512_bf16", "amx_bf16", "bf16"} & set(hardware["cpu_flags"]))
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} <= set(scc.provenance.CPU_FLAGS)


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

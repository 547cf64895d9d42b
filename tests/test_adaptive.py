"""The adaptive protocol (scc.eval.adaptive, scc.eval.suite, scc.attacks.adaptive): each attack on a handful of digits with few steps, checked for a property
that can fail; the worst case, the report files, the CLI's warning line and the Ray sharding."""
import json
import signal

import pytest
import torch

import scc
from scc.attacks.adaptive import KnownDraws, bpda_objective, ce_objective, eot_objective, madry_step, sign_pgd
from scc.eval.adaptive import evaluate
from scc.eval.report import format_adaptive_table, write_report
from scc.eval.suite import Suite, attack_batch, build_rows, merge, sanity_flags
from scc.attacks import pgd
from scc.cli import main
from scc.errors import SccError

EPS = 4 / 255
TINY_SUITE = dict(pgd_steps=3, apgd_steps=3, eot_steps=2, eot_k=2, bpda_steps=2, transfer_steps=2, queries=5,
                  fab_steps=2, targets=2, sanity_images=2, sanity_steps=2, checkpoints=(0, 1, 3))


@pytest.fixture(scope="module")
def few(digits):
    return digits[0][:6], digits[1][:6]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_exact_pgd_through_none_equals_our_pgd(tiny, few):
    x, y = few
    d = scc.defend(tiny, "none", seed=0)
    ours = pgd(tiny, x, y, eps=EPS, alpha=1 / 255, steps=4, generator=torch.Generator().manual_seed(3))
    known = KnownDraws(d, x, range(len(y)), EPS)
    adaptive, _ = sign_pgd(ce_objective(known, y), x, y, EPS, 4, alpha=1 / 255,
                           generator=torch.Generator().manual_seed(3))
    assert (adaptive - ours).abs().max() < 1e-6


def test_known_draws_maps_sub_batches_to_keys(tiny, few):
    x, y = few
    d = scc.defend(tiny, "scc", preset="latency", seed=5)
    keys = [100 + i for i in range(len(y))]
    known = KnownDraws(d, x, keys, EPS)
    adv = (x + EPS * torch.empty_like(x).uniform_(-1, 1)).clamp(0, 1)
    rows = [4, 1, 5]
    with torch.no_grad():
        got = known(adv[rows])
        want = d(adv[rows], keys=[keys[r] for r in rows])
        other = d(adv[rows], keys=[keys[r] + 1000 for r in rows])
    assert known.last_rows.tolist() == rows
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, other, atol=1e-6)  # the draws matter: a wrong key would show
    with pytest.raises(SccError, match="exactly one"):
        known(torch.rand_like(x[:2]))  # rows near no clean image


def test_eot_with_one_known_draw_is_exact_pgd(tiny, few):
    x, y = few
    d = scc.defend(tiny, "ttc", seed=1)
    known = KnownDraws(d, x, range(len(y)), EPS)
    exact, _ = sign_pgd(ce_objective(known, y), x, y, EPS, 3, madry_step(EPS, 3),
                        generator=torch.Generator().manual_seed(0), keep_best=True)
    eot, _ = sign_pgd(eot_objective(d, y, 1, lambda rep: known.draws), x, y, EPS, 3, madry_step(EPS, 3),
                      generator=torch.Generator().manual_seed(0), keep_best=True)
    assert torch.equal(exact, eot)


def test_bpda_clamp_term(tiny, few):
    """Where x + Delta sits on the [0,1] boundary the clamp-aware BPDA gradient is 0 and identity BPDA's is not;
    elsewhere they agree."""
    x, y = few
    d = scc.defend(tiny, "ttc", seed=2)
    draws = d.draws(x, list(range(len(y))))
    grads = {}
    for clamp in (True, False):
        xa = x.clone().requires_grad_(True)
        loss, _ = bpda_objective(d, y, draws, clamp_grad=clamp)(xa)
        grads[clamp], = torch.autograd.grad(loss.sum(), xa)
    with torch.no_grad():
        z = x + d.perturbation(x, draws=draws)
    pinned = (z <= 0) | (z >= 1)
    assert pinned.any() and (~pinned).any()
    assert (grads[True][pinned] == 0).all()
    assert (grads[False][pinned] != 0).any()
    assert torch.allclose(grads[True][~pinned], grads[False][~pinned])


def test_exact_gradient_flows_through_the_defense(tiny, few):
    """The exact gradient of the defended module is not BPDA's identity gradient (the clamp Jacobian enters)."""
    x, y = few
    d = scc.defend(tiny, "ttc", seed=2)
    known = KnownDraws(d, x, range(len(y)), EPS)
    xa = x.clone().requires_grad_(True)
    loss, _ = ce_objective(known, y)(xa)
    exact, = torch.autograd.grad(loss.sum(), xa)
    xb = x.clone().requires_grad_(True)
    loss, _ = bpda_objective(d, y, known.draws, clamp_grad=False)(xb)
    identity, = torch.autograd.grad(loss.sum(), xb)
    assert exact.abs().sum() > 0 and not torch.allclose(exact, identity)


def test_transfer_surrogate_semantic_off_equals_zero_steps(tiny, few):
    """The transfer attack's surrogate (semantic=False) computes what steps=0 computes, one forward cheaper."""
    x, _ = few
    a = scc.defend(tiny, "scc", seed=4, semantic=False)
    b = scc.defend(tiny, "scc", seed=4, steps=0)
    with torch.no_grad():
        assert torch.allclose(a(x, keys=range(len(x))), b(x, keys=range(len(x))), atol=1e-5)


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "eot-pgd", "bpda-pgd",
                                    "transfer-nocorrect", "square"])
def test_each_attack_stays_in_the_ball(tiny, few, attack):
    x, y = few
    d = scc.defend(tiny, "scc", preset="latency", seed=0)
    adv, _ = attack_batch(attack, d, x, y, list(range(len(y))), EPS, Suite(**TINY_SUITE), 0, 0)
    assert adv.shape == x.shape and (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_apgd_ce_at_least_as_strong_as_pgd10(tiny, digits):
    from scc.attacks import apgd as run_apgd

    x, y = digits[0][:64], digits[1][:64]
    pgd10 = accuracy(tiny, pgd(tiny, x, y, eps=EPS, alpha=1 / 255, steps=10,
                               generator=torch.Generator().manual_seed(0)), y)
    apgd = accuracy(tiny, run_apgd(tiny, x, y, EPS, loss="ce", steps=100, restarts=1, seed=0), y)
    assert apgd <= pgd10 + 0.04, f"APGD-CE-100 {apgd:.3f} vs PGD-10 {pgd10:.3f}"


def _raw():
    c = lambda *bits: {i: bool(b) for i, b in enumerate(bits)}
    return {"correct": {("ttc", EPS, "none", "known"): c(1, 1, 1, 0), ("ttc", EPS, "pgd", "known"): c(1, 0, 1, 0),
                        ("ttc", EPS, "square", "known"): c(1, 1, 0, 1),
                        ("ttc", EPS, "none", "fresh"): c(1, 1, 1, 1), ("ttc", EPS, "pgd", "fresh"): c(1, 1, 1, 1),
                        ("ttc", EPS, "square", "fresh"): c(1, 1, 1, 1)},
            "curves": {}, "seconds": {("ttc", EPS, "pgd"): [2.0, 4]}, "sanity": {}, "defense_seconds": {"ttc": [1, 4]}}


def test_worst_case_is_and_over_attacks():
    rows = build_rows(_raw(), ["ttc"], [EPS], Suite(attacks=("pgd", "square")))
    worst = {r["draws"]: r for r in rows if r["attack"] == "worst"}
    assert worst["known"]["accuracy"] == 0.25  # only image 0 is correct clean, under pgd and under square
    assert worst["fresh"]["accuracy"] == 1.0
    assert abs(worst["known"]["stderr"] - (0.25 * 0.75 / 4) ** 0.5) < 1e-12
    pgd_known = next(r for r in rows if r["attack"] == "pgd" and r["draws"] == "known")
    assert pgd_known["attack_s_per_image"] == 0.5 and pgd_known["steps"] == 50


def test_merge_of_shards_equals_the_whole():
    raw = _raw()
    halves = [{**raw, "correct": {k: {i: v for i, v in d.items() if i % 2 == h} for k, d in raw["correct"].items()},
               "seconds": {k: [s / 2, n / 2] for k, (s, n) in raw["seconds"].items()}} for h in (0, 1)]
    merged = merge(halves)
    assert merged["correct"] == raw["correct"] and merged["seconds"] == raw["seconds"]


def test_sanity_flags_catch_masking_and_eps():
    """Each check flags its symptom, and a healthy report (or a rise within two standard errors) flags nothing."""
    def report(square, worst_8, curve, at_16):
        rows = [{"defense": "ttc", "preset": "paper", "protocol": "adaptive", "draws": "known", "attack": a, "eps": e,
                 "accuracy": acc, "stderr": 0.01} for a, e, acc in
                [("pgd", EPS, 0.6), ("square", EPS, square), ("worst", EPS, 0.2), ("worst", 8 / 255, worst_8)]]
        return sanity_flags({"results": rows, "steps_curves": [
            {"defense": "ttc", "spec": "ttc", "eps": EPS, "draws": "fresh", "steps": [0, 10], "accuracy": curve,
             "n": 100}],
            "sanity_16": [{"defense": "ttc", "spec": "ttc", "eps": 16 / 255, "steps": 20, "accuracy": at_16, "n": 32}]})

    flags = report(square=0.3, worst_8=0.5, curve=[0.2, 0.9], at_16=0.5)
    text = "\n".join(flags)
    assert "FLAG: Square" in text and "FLAG: accuracy rises with eps" in text
    assert "FLAG: accuracy rises with PGD steps" in text and "FLAG: ttc keeps 50.0%" in text
    assert sum(f.startswith("FLAG: ") for f in flags) == 4, flags
    for healthy in (report(square=0.7, worst_8=0.05, curve=[0.9, 0.2], at_16=0.0),
                    report(square=0.59, worst_8=0.21, curve=[0.2, 0.21], at_16=0.1)):  # noise, not a symptom
        assert not [f for f in healthy if f.startswith("FLAG")], healthy
        assert sum(f.startswith("ok: ") for f in healthy) == 4, healthy


def test_evaluate_report_schema_and_files(tmp_path):
    report = evaluate(defenses=["none", "scc-latency"], eps_list=[EPS], n_images=4, batch_size=4, seed=0,
                      suite=Suite(**TINY_SUITE), progress=False, log=lambda line: None)
    rows = report["results"]
    attacks = {r["attack"] for r in rows}
    assert attacks == {"none", "pgd", "apgd-ce", "apgd-dlr", "eot-pgd", "bpda-pgd", "transfer-nocorrect", "square",
                       "worst"}
    for r in rows:
        assert r["protocol"] in ("paper", "adaptive") and r["draws"] in ("known", "fresh", None)
        assert {"steps", "stderr", "accuracy", "eps", "defense", "preset"} <= set(r)
    assert not any(r["attack"] == "transfer-nocorrect" and r["defense"] == "none" for r in rows)
    assert report["seed"] == 0 and report["threads"] >= 1 and "torch" in report["versions"]
    for r in rows:  # worst <= every attack of the same defense and draws
        if r["attack"] == "worst":
            same = [s for s in rows if s["draws"] == r["draws"] and s["defense"] == r["defense"]
                    and s["preset"] == r["preset"] and s["protocol"] == "adaptive"]
            assert r["accuracy"] <= min(s["accuracy"] for s in same)
    assert "known / fresh" in format_adaptive_table(report)
    pytest.importorskip("matplotlib")
    written = write_report(report, tmp_path)
    assert sorted(p.name for p in written) == ["acc_vs_eps.png", "acc_vs_steps.png", "report.json", "report.md"]
    assert all(p.parent == tmp_path for p in written)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))  # the whole report
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Robust accuracy (adaptive protocol)")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ["none", "scc-latency"]  # one row per defense
    worst = next(r for r in rows if r["attack"] == "worst" and r["draws"] == "known" and r["preset"] == "latency")
    assert f"{100 * worst['accuracy']:.1f} / " in table[-1]  # the known-draws worst case reaches its cell
    for png in ("acc_vs_eps.png", "acc_vs_steps.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_paper_protocol_warns_and_writes(tmp_path, capsys):
    code = main(["eval", "--defenses", "none", "--attacks", "pgd", "--eps", "1/255", "--images", "8", "--quiet",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert sum("not a robustness claim" in line for line in out.splitlines()) == 1
    assert "--protocol adaptive" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["protocol"] == "paper" and all(r["draws"] is None for r in report["results"])


def test_cli_adaptive_no_warning_and_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["eval", "--protocol", "adaptive", "--images", "2", "--out", str(blocker / "sub")]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    code = main(["eval", "--protocol", "adaptive", "--defenses", "none", "--attacks", "bpda-pgd,square", "--dtype",
                 "bf16", "--queries", "5", "--images", "3", "--eps", "4/255", "--quiet", "--workers", "1",
                 "--json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0 and "not a robustness claim" not in captured.out
    assert "estimated cost" in captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert {r["attack"] for r in report["results"]} == {"none", "pgd", "bpda-pgd", "square", "worst"}
    # --dtype reaches the adaptive run: the attacks and the scoring ran the bf16 tower, and the report says so
    assert report["dtype"] == "bf16" and {r["dtype"] for r in report["results"]} == {"bf16"}
    assert report["backend"] == "eager"


def test_one_eval_parser_for_both_protocols(capsys, monkeypatch):
    """--attacks names the protocol's attacks (every unknown one named); --adaptive-attacks is its adaptive alias;
    a missing extra is named with its pip command before any work."""
    assert main(["eval", "--attacks", "pgd,eot-pgd,magic"]) == 2
    assert "unknown paper-protocol attack(s) ['eot-pgd', 'magic']" in capsys.readouterr().err
    assert main(["eval", "--protocol", "adaptive", "--attacks", "cw"]) == 2
    assert "unknown adaptive-protocol attack(s) ['cw']" in capsys.readouterr().err
    assert main(["eval", "--protocol", "adaptive", "--attacks", "pgd", "--adaptive-attacks", "square"]) == 2
    assert "--attacks and --adaptive-attacks disagree" in capsys.readouterr().err
    assert main(["eval", "--adaptive-attacks", "square"]) == 2
    assert "belongs to --protocol adaptive" in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    for argv in (["eval", "--attacks", "apgd-ce", "--out", "plots"], ["eval", "--protocol", "adaptive", "--out", "p"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "matplotlib" in err and "pip install 'scc-defense[plots]'" in err, err


@pytest.fixture
def local_ray(monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'scc-defense[ray]')")
    monkeypatch.setenv("RAY_worker_niceness", "0")  # Ray's default (15) crawls on a shared machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.serve  # starts a local Ray cluster
def test_ray_shards_equal_one_process(local_ray):
    def timeout(*_):
        raise TimeoutError("the Ray evaluation took more than 240 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(240)
    try:
        kw = dict(defenses=["ttc"], eps_list=[EPS], n_images=4, batch_size=2, seed=7, progress=False,
                  log=lambda line: None,
                  suite=Suite(**{**TINY_SUITE, "attacks": ("pgd", "eot-pgd", "apgd-ce"), "sanity_images": 0}))
        sharded = evaluate(ray_address="auto", **kw)
        single = evaluate(**kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    acc = lambda rep: [(r["attack"], r["draws"], r["accuracy"]) for r in rep["results"]]
    assert acc(sharded) == acc(single)
    assert sharded["steps_curves"] == single["steps_curves"]


def test_local_workers_equal_one_process(capsys):
    """`--workers 2`: batches over two spawned processes, merged; same accuracies and curves as one process."""
    kw = dict(defenses=["ttc"], eps_list=[EPS], n_images=5, batch_size=2, seed=7, progress=False,
              suite=Suite(**{**TINY_SUITE, "attacks": ("pgd", "square"), "sanity_images": 0}))
    lines = []
    pooled = evaluate(workers=2, log=lines.append, **kw)
    single = evaluate(log=lambda line: None, **kw)
    acc = lambda rep: [(r["attack"], r["draws"], r["accuracy"], r["n"]) for r in rep["results"]]
    assert acc(pooled) == acc(single)
    assert pooled["steps_curves"] == single["steps_curves"]
    assert pooled["workers"] == 2 and single["workers"] == 1
    assert len(lines) == 1 and "over 2 worker processes" in lines[0]
    with pytest.raises(SccError, match="positive number of processes"):
        evaluate(workers=0, log=lambda line: None, **kw)


def test_cost_estimate_times_every_attack_before_the_work(tiny, few):
    """The estimate runs each job with 2-step budgets (every attack copes with them) and scales it to the full
    budget; the CLI prints it on its own line before the progress bar starts."""
    from scc.eval.options import ADAPTIVE_ATTACKS
    from scc.eval.suite import estimate_cost, jobs_of

    x, y = few
    suite = Suite(attacks=ADAPTIVE_ATTACKS)
    cost = estimate_cost(tiny, ["none", "dbd"], [EPS], x[:2], y[:2], suite, seed=0)  # between them: every attack
    jobs = jobs_of(["none", "dbd"], [EPS], suite, tiny.num_classes)
    assert {attack for _, _, attack in jobs} == {"paper-pgd", *ADAPTIVE_ATTACKS}
    assert set(cost) == {(label or "clf", eps, "paper-pgd" if label is None else attack) for label, eps, attack in jobs}
    assert all(wall > 0 and cpu > 0 for wall, cpu in cost.values())


def test_cli_prints_the_estimate_before_the_progress_bar(capsys):
    assert main(["eval", "--protocol", "adaptive", "--defenses", "none", "--attacks", "pgd", "--images", "3",
                 "--eps", "4/255", "--workers", "1", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    at = err.index("estimated cost")
    assert (at == 0 or err[at - 1] == "\n") and at < err.index("adaptive eval")


# ----------------------------------------------------------------------------------------------------------
# plots (scc.eval.report): what they draw, not their pixels
# ----------------------------------------------------------------------------------------------------------
def adaptive_report(eps_list, defenses=("none", "ttc", "scc")):
    """An adaptive report's rows: clean, pgd and worst per draws, paper pgd, and PGD trajectories."""
    def row(defense, attack, eps, draws, accuracy, protocol="adaptive"):
        return {"defense": defense, "preset": "paper", "attack": attack, "eps": eps, "draws": draws,
                "protocol": protocol, "accuracy": accuracy, "stderr": 0.05, "steps": 50}

    rows, curves = [], []
    for i, d in enumerate(defenses):
        for draws in ("known", "fresh"):
            rows.append(row(d, "none", 0.0, draws, 0.95))
            for e in eps_list:
                rows += [row(d, "pgd", e, draws, 0.6 - i / 10), row(d, "worst", e, draws, 0.5 - i / 10 - e)]
                curves.append({"defense": d, "spec": d, "eps": e, "draws": draws, "attack": "pgd", "steps": [0, 1, 10],
                               "accuracy": [0.9, 0.7, 0.5], "n": 10})
        rows += [row(d, "pgd", e, None, 0.7, protocol="paper") for e in eps_list]
    return {"protocol": "adaptive", "model": "scc-tiny-digits", "dataset": "digits", "n_images": 10,
            "results": rows, "steps_curves": curves}


@pytest.fixture
def axes():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield fig, ax
    plt.close(fig)


def legend_outside(fig, ax) -> bool:
    fig.canvas.draw()
    return ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_one_eps_gives_grouped_bars(axes):
    from matplotlib.container import BarContainer
    from scc.eval.report import plot_bars

    fig, ax = axes
    plot_bars(adaptive_report([EPS]), ax)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["clean, known draws", "clean, fresh draws", "robust, known draws",
                                             "robust, fresh draws"]
    assert all(len(b) == 3 for b in bars)  # one per defense
    robust_known = [p.get_height() for p in bars[2]]  # the worst case, per defense in the report's order
    assert robust_known == pytest.approx([100 * (0.5 - i / 10 - EPS) for i in range(3)])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "ttc", "scc"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [b.get_label() for b in bars]
    assert legend_outside(fig, ax)


def test_several_eps_give_lines_with_distinct_colours_and_markers(axes):
    from matplotlib.container import ErrorbarContainer
    from scc.eval.report import plot_lines

    fig, ax = axes
    plot_lines(adaptive_report([1 / 255, EPS, 8 / 255], defenses=("none", "ttc", "scc", "dbd")), ax)
    lines = [c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(lines) == 4 * 2  # the worst case per defense, known and fresh draws
    assert all(list(line.get_xdata()) == pytest.approx([0, 1, 4, 8]) for line in lines)  # 0 = clean
    styles = {(line.get_color(), line.get_marker()) for line in lines}
    assert len(styles) == 4 and len({c for c, _ in styles}) == 4 and len({m for _, m in styles}) == 4
    assert {line.get_linestyle() for line in lines} == {"-", "--"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["none", "ttc", "scc", "dbd", "known draws", "fresh draws"]
    assert legend_outside(fig, ax)


def test_steps_plot_keeps_each_defense_style_and_panels_per_eps(axes):
    from scc.eval.report import defense_styles, plot_steps

    fig, _ = axes
    fig.clf()
    report = adaptive_report([1 / 255, EPS])
    plot_steps(report, fig)
    panels = fig.axes
    assert len(panels) == 2
    styles = defense_styles(report)
    drawn = {(line.get_color(), line.get_marker()) for line in panels[0].get_lines()}
    assert drawn == set(styles.values())
    assert legend_outside(fig, panels[-1])


def test_a_report_without_rows_draws_no_plot(tmp_path):
    from scc.eval.report import write_plots

    assert write_plots({**adaptive_report([EPS]), "results": []}, tmp_path) == []

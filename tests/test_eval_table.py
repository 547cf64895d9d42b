"""`scc eval` in the paper protocol: attack names (apgd, autoattack), the AutoAttack settings in the report, the Table 1
layout over several datasets, and per-defense config overrides (the ablation) from --defenses."""
import json

import pytest
import torch

import scc
from scc.attacks import Settings
from scc.cli import main
from scc.defenses import make_config, parse_defense, parse_defenses, spec_of, split_spec
from scc.errors import SccError
from scc.eval import paper
from scc.eval.options import parse_attacks
from scc.eval.report import format_table1, table1_rows

from test_adaptive import axes, legend_outside  # the plot tests' figure and legend check


# ----------------------------------------------------------------------------------------------------------
# attack names
# ----------------------------------------------------------------------------------------------------------
def test_apgd_and_autoattack_are_attacks_of_the_paper_protocol():
    assert parse_attacks("pgd,apgd,autoattack,fab-t", "paper") == ["pgd", "apgd", "autoattack", "fab-t"]
    assert parse_attacks("apgd-t,fab-t", "adaptive") == ["apgd-t", "fab-t"]
    assert "apgd-t" not in parse_attacks(None, "adaptive")  # opt-in in the adaptive suite
    with pytest.raises(SccError, match=r"\['autoattak'\].*autoattack \(= standard AutoAttack"):
        parse_attacks("autoattak", "paper")


def test_autoattack_report_carries_its_settings_and_log(tiny):
    small = Settings(apgd_steps=4, apgd_targets=2, fab_steps=3, fab_targets=2, square_queries=10)
    report = paper.run(defenses=["none", "ttc"], attacks=[("autoattack", 4 / 255), ("apgd", 4 / 255)], n_images=8,
                       progress=False, settings=small)
    settings = report["attack_settings"]
    assert settings["autoattack"]["sequence"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert settings["autoattack"]["square"]["queries"] == 10 and settings["autoattack"]["apgd-t"]["target_classes"] == 2
    assert settings["apgd"]["sequence"] == ["apgd-ce", "apgd-dlr"]
    log = {row["attack"]: row for row in report["autoattack_log"]}
    none = {r["attack"]: r["accuracy"] for r in report["results"] if r["defense"] == "none"}
    assert log["autoattack"]["square"] == round(none["autoattack"] * 8)  # the classifier's count after the last one
    assert log["autoattack"]["clean"] >= log["autoattack"]["apgd-ce"] >= log["autoattack"]["square"]
    assert Settings().describe(("fab-t", "square")) == {
        "norm": "Linf", "sequence": ["fab-t", "square"], "on": "images still correct after the previous components",
        "implementation": "scc.attacks (checked against torchattacks)",
        "fab-t": {"steps": 100, "restarts": 1, "target_classes": 9, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
        "square": {"queries": 5000, "p_init": 0.8, "restarts": 1, "rescale_schedule": False, "loss": "margin"}}


# ----------------------------------------------------------------------------------------------------------
# Table 1 layout
# ----------------------------------------------------------------------------------------------------------
def _report(dataset, accs):
    """A paper report whose rows are {(spec, attack): accuracy}."""
    rows = []
    for (spec, attack), acc in accs.items():
        name, preset = split_spec(spec)
        rows.append({"defense": name, "preset": preset, "attack": attack, "eps": 0.0 if attack == "none" else 1 / 255,
                     "accuracy": acc})
    return {"dataset": dataset, "results": rows, "n_images": 10, "seed": 0}


def test_table1_rows_deltas_and_average():
    reports = [_report("a", {("none", "none"): 0.9, ("none", "pgd"): 0.1, ("ttc", "none"): 0.8, ("ttc", "pgd"): 0.5}),
               _report("b", {("none", "none"): 0.7, ("none", "pgd"): 0.3, ("ttc", "none"): 0.6, ("ttc", "pgd"): 0.2})]
    rows = {(r["dataset"], r["spec"]): r for r in table1_rows(reports)}
    assert rows["a", "ttc"]["delta_rob"] == pytest.approx(0.4) and rows["b", "ttc"]["delta_acc"] == pytest.approx(-0.1)
    avg = rows["average", "ttc"]
    assert (avg["acc"], avg["rob"], avg["delta_acc"], avg["delta_rob"]) == pytest.approx((0.7, 0.35, -0.1, 0.15))
    assert rows["average", "none"]["delta_rob"] is None
    text = format_table1({"table1": table1_rows(reports), "datasets": ["a", "b"], "models": ["m", "m"],
                          "reports": reports})
    assert "average" in text and "35.0 (+15.0)" in text and "70.0 (-10.0)" in text


def test_eval_several_datasets_prints_table1(tmp_path, capsys):
    out, js = tmp_path / "t1", tmp_path / "t1.json"
    code = main(["eval", "--dataset", "digits,fashion", "--defenses", "none,scc-latency:spatial=off", "--attacks", "pgd",
                 "--eps", "4/255", "--images", "6", "--threads", "1", "--quiet", "--json", str(js), "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "PGD at 4/255" in text and "scc-latency:spatial=off" in text and "average" in text
    report = json.loads(js.read_text())
    assert report["layout"] == "table1" and report["datasets"] == ["digits", "fashion"]
    assert report["models"] == ["scc-tiny-digits", "scc-tiny-fashion"]  # each dataset's own bundled model
    assert {(r["defense"], r["spec"]) for r in report["table1"]} == {("none", "none"),
                                                                    ("scc", "scc-latency:spatial=off")}
    md = (out / "report.md").read_text()
    assert "| **average** |" in md and "scc-latency:spatial=off Rob" in md
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "table1.png"]


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "digits,fashion", "--protocol", "adaptive"], "run the adaptive protocol once per dataset"),
    (["--dataset", "digits,digits"], "listed twice"),
    (["--dataset", "digits,cifar10:/nonexistent"], "not found under '/nonexistent'"),
    (["--defenses", "none,scc:semantic=maybe"], "bad value 'maybe' for semantic"),
    (["--defenses", "scc:bogus=1"], "settings: aggregate, alpha"),
])
def test_eval_refuses_before_any_work(capsys, argv, message):
    assert main(["eval", "--images", "2", "--quiet"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------------------
# config overrides in specs (the ablation)
# ----------------------------------------------------------------------------------------------------------
def test_override_specs_round_trip():
    assert parse_defenses("SCC:Semantic=OFF:spatial=0, scc-latency:warmup.steps=2,ttc:eps=2/255") == [
        "scc:semantic=off:spatial=off", "scc-latency:warmup.steps=2", "ttc:eps=2/255"]
    assert split_spec("scc-latency:steps=2") == ("scc", "latency:steps=2")
    assert spec_of("scc", "paper:semantic=off") == "scc:semantic=off"
    assert parse_defense("scc:views=id|noise") == ("scc", "paper:views=id|noise")
    cfg = make_config("scc", "latency:warmup.steps=2:views=id|noise:sigma=0.02")
    assert (cfg.warmup.steps, cfg.views, cfg.sigma, cfg.steps, cfg.fuse) == (2, ("id", "noise"), 0.02, 1, True)
    assert make_config("ttc", "paper:eps=2/255").eps == pytest.approx(2 / 255)
    with pytest.raises(SccError, match="a defense is listed twice"):
        parse_defenses("scc:semantic=off,scc:semantic=0")
    with pytest.raises(SccError, match="bad override 'steps'"):
        parse_defenses("scc:steps")
    with pytest.raises(SccError, match="warmup has no setting 'foo'; settings: alpha, beta, eps, steps, tau_thres"):
        parse_defenses("scc:warmup.foo=1")


def test_both_modules_off_is_ttc(tiny, digits):
    """The paper's ablation: SCC with the semantic and the spatial module off computes TTC (same draws)."""
    x = digits[0][:8]
    both_off = scc.defend(tiny, "scc:semantic=off:spatial=off", seed=0)
    assert both_off.spec == "scc:semantic=off:spatial=off" and not both_off.config.semantic
    with torch.no_grad():
        assert torch.equal(both_off(x, keys=range(8)), scc.defend(tiny, "ttc", seed=0)(x, keys=range(8)))
        semantic_only = scc.defend(tiny, "scc", preset="paper:spatial=off", seed=0)(x, keys=range(8))
        assert not torch.equal(semantic_only, both_off(x, keys=range(8)))


# ----------------------------------------------------------------------------------------------------------
# the paper protocol's plot (scc.eval.report): clean accuracy included, bars at one eps, lines over several
# ----------------------------------------------------------------------------------------------------------
def paper_report(attacks, eps_list, clean=True):
    rows = [{"defense": d, "preset": "paper", "attack": a, "eps": e, "draws": None, "protocol": "paper",
             "accuracy": acc, "stderr": 0.02, "steps": 10}
            for d, base in (("none", 0.9), ("ttc", 0.8), ("scc", 0.85))
            for a, e, acc in ([("none", 0.0, base)] if clean else []) + [(a, e, base - 10 * e) for a in attacks
                                                                        for e in eps_list]]
    return {"protocol": "paper", "model": "scc-tiny-digits", "dataset": "digits", "n_images": 64, "results": rows}


def test_paper_plot_one_eps_is_bars_with_the_clean_accuracy(axes):
    from matplotlib.container import BarContainer
    from scc.eval.report import plot_bars

    fig, ax = axes
    plot_bars(paper_report(["pgd", "cw"], [1 / 255]), ax)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["clean", "PGD 1/255", "CW 1/255"]
    assert [p.get_height() for p in bars[0]] == pytest.approx([90, 80, 85])
    assert legend_outside(fig, ax)
    ax.clear()
    plot_bars(paper_report(["pgd"], [1 / 255], clean=False), ax)  # --no-clean: no clean bar
    assert [c.get_label() for c in ax.containers if isinstance(c, BarContainer)] == ["PGD 1/255"]


def test_paper_plot_several_eps_is_lines_from_the_clean_point(axes):
    from matplotlib.container import ErrorbarContainer
    from scc.eval.report import plot_lines

    fig, ax = axes
    plot_lines(paper_report(["pgd", "cw"], [1 / 255, 4 / 255]), ax)
    lines = [c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(lines) == 3 * 2
    assert all(list(line.get_xdata()) == pytest.approx([0, 1, 4]) for line in lines)
    assert sorted(line.get_ydata()[0] for line in lines) == pytest.approx([80, 80, 85, 85, 90, 90])  # clean first
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "ttc", "scc", "pgd", "cw"]

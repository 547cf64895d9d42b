"""The evaluation reports: the adaptive known / fresh table, the paper's Table 1 layout over several datasets,
Markdown, the two plots, and writing them to a folder that was checked before any attack ran.

    print(format_adaptive_table(report))
    print(format_table1(table))      # scc.eval.paper.run_datasets: datasets x defenses, Acc / Rob, delta, average
    write_report(report, "out/")     # report.json, report.md, acc_vs_eps.png, acc_vs_steps.png (Table 1: no plots)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..defenses import spec_of, split_spec
from ..errors import SccError, require_extra


# column order of every table: clean, the paper protocol's attacks, then the adaptive suite and its worst case
ATTACK_ORDER = ("none", "pgd", "cw", "pgd100", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "apgd", "autoattack",
                "eot-pgd", "bpda-pgd", "transfer-nocorrect", "square", "surrogate-pgd", "worst")


def _spec(r: dict) -> str:
    return spec_of(r["defense"], r["preset"])


def _col_name(r: dict) -> str:
    if r["attack"] == "none":
        return "clean"
    steps = f"-{r['steps']}" if r.get("steps") and r["attack"] not in ("worst", "square") else ""
    base = {"square": f"square-{r.get('steps')}q"}.get(r["attack"], r["attack"] + steps)
    return ("paper " if r["protocol"] == "paper" else "") + base


def table_cells(report: dict) -> tuple[list[str], dict[str, dict[str, str]], list[float]]:
    """Columns and rows of the adaptive table: cell = 'known / fresh' accuracy (%), one block per eps."""
    eps_values = sorted({r["eps"] for r in report["results"] if r["attack"] != "none"})
    order = {a: i for i, a in enumerate(ATTACK_ORDER)}
    cols, rows = [], {}
    ranked = sorted(report["results"], key=lambda r: (r["eps"] if r["attack"] != "none" else -1,
                                                     r["protocol"] != "paper", order.get(r["attack"], 99)))
    for r in ranked:
        lab = _spec(r)
        eps_tag = "" if r["attack"] == "none" else f" @{r['eps'] * 255:g}"
        col = _col_name(r) + (eps_tag if len(eps_values) > 1 else "")
        if col not in cols:
            cols.append(col)
        cell = rows.setdefault(lab, {}).setdefault(col, {})
        cell[r["draws"] or "paper"] = r
    text = {}
    for lab, cells in rows.items():
        text[lab] = {}
        for col, c in cells.items():
            if "paper" in c:
                text[lab][col] = f"{100 * c['paper']['accuracy']:.1f}"
            else:
                k, f = c.get("known"), c.get("fresh")
                text[lab][col] = " / ".join(f"{100 * v['accuracy']:.1f}" if v else "-" for v in (k, f))
    return cols, text, eps_values


def format_adaptive_table(report: dict) -> str:
    cols, text, eps_values = table_cells(report)
    width = max([14] + [len(c) + 2 for c in cols])
    head = f"{'defense':<14}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [f"accuracy %, known / fresh draws (paper: non-adaptive, one number); "
             f"n = {report['n_images']}, eps = {', '.join(f'{e * 255:g}/255' for e in eps_values)}", head,
             "-" * len(head)]
    for lab, cells in text.items():
        lines.append(f"{lab:<14}" + "".join(f"{cells.get(c, '-'):>{width}}" for c in cols))
    worst = [r for r in report["results"] if r["attack"] == "worst"]
    if worst:
        lines.append("worst case +- standard error: " + "; ".join(
            f"{_spec(r)} {r['eps'] * 255:g}/255 {r['draws']} {100 * r['accuracy']:.1f}+-{100 * r['stderr']:.1f}"
            for r in worst))
    return "\n".join(lines)


def _partial_note(report: dict) -> list[str]:
    """A report cut short (scc.cli.interrupts) says so at the top of its Markdown."""
    if not report.get("partial"):
        return []
    f = report["finished"]
    missing = report.get("missing") or []
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    return [f"**Partial: interrupted after {f['done']} of {f['total']} {f['unit']}" +
            (f"; missing: {shown}" if shown else "") + ".**", ""]


def format_markdown(report: dict) -> str:
    cols, text, eps_values = table_cells(report)
    out = [f"# Robust accuracy ({report['protocol']} protocol)", "", *_partial_note(report),
           f"model `{report['model']}`, dataset `{report['dataset']}`, {report['n_images']} images, seed "
           f"{report['seed']}, {report.get('threads')} thread(s). Cells: accuracy % with known / fresh draws "
           "(paper rows: non-adaptive, one number).", "",
           "| defense | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lab, cells in text.items():
        out.append(f"| {lab} | " + " | ".join(cells.get(c, "-") for c in cols) + " |")
    costs = [r for r in report["results"] if r.get("attack_s_per_image") and r["draws"] != "fresh"]
    if costs:
        out += ["", "Attack cost, seconds per image: wall (CPU time of the process; on a shared machine the wall "
                "time includes waiting for the cores):", ""]
        out += [f"- {_spec(r)} {_col_name(r)} @{r['eps'] * 255:g}/255: {r['attack_s_per_image']:.3f} "
                f"({(r.get('attack_cpu_s_per_image') or 0):.3f})" for r in costs]
    if report.get("sanity"):
        out += ["", "Sanity checks:", ""] + [f"- {f}" for f in report["sanity"]]
    if report.get("notes"):
        out += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    out += _backbone_lines([(report["model"], report.get("backbones") or {})])
    if report.get("warning"):
        out += ["", f"**{report['warning']}**"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The paper's Table 1 layout: one block per (attack, eps); rows = datasets and their average; per defense the
# clean accuracy (Acc) and the robust accuracy (Rob), each with its difference to the undefended model ("none").
# ----------------------------------------------------------------------------------------------------------
def table1_rows(reports: list[dict]) -> list[dict]:
    """Flat records {"attack", "eps", "dataset" (or "average"), "defense" (the bare name), "spec", "acc", "rob",
    "delta_acc", "delta_rob"} (accuracies in [0,1]; None where not measured; deltas against "none" when present)
    from paper-protocol reports, one per dataset. The average is the mean over the datasets (None if one lacks
    the cell)."""
    blocks = []
    for rep in reports:
        for r in rep["results"]:
            if r["attack"] != "none" and (r["attack"], r["eps"]) not in blocks:
                blocks.append((r["attack"], r["eps"]))
    blocks = blocks or [("none", 0.0)]
    specs = list(dict.fromkeys(_spec(r) for rep in reports for r in rep["results"]))
    out = []
    for attack, eps in blocks:
        per_dataset = []
        for rep in reports:
            acc = {_spec(r): r["accuracy"] for r in rep["results"] if r["attack"] == "none"}
            rob = {_spec(r): r["accuracy"] for r in rep["results"] if (r["attack"], r["eps"]) == (attack, eps)}
            per_dataset.append((rep["dataset"], {lab: (acc.get(lab), rob.get(lab) if attack != "none" else None)
                                                 for lab in specs}))
        mean = lambda vals: None if any(v is None for v in vals) else sum(vals) / len(vals)
        average = {lab: tuple(mean([cells[lab][i] for _, cells in per_dataset]) for i in (0, 1)) for lab in specs}
        for dataset, cells in per_dataset + [("average", average)]:
            base = cells.get("none", (None, None))
            for lab in specs:
                a, b = cells[lab]
                diff = lambda v, ref: None if v is None or ref is None or lab == "none" else v - ref
                out.append({"attack": attack, "eps": eps, "dataset": dataset, "defense": split_spec(lab)[0],
                            "spec": lab, "acc": a, "rob": b, "delta_acc": diff(a, base[0]),
                            "delta_rob": diff(b, base[1])})
    return out


def _cell(value: float | None, delta: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + ("" if delta is None else f" ({100 * delta:+.1f})")


def _blocks(table: dict) -> list[tuple[str, list[str], list[str], dict]]:
    """(title, datasets, specs, {(dataset, spec): record}) per (attack, eps) block of a Table 1 report."""
    out = {}
    for r in table["table1"]:
        out.setdefault((r["attack"], r["eps"]), []).append(r)
    blocks = []
    for (attack, eps), recs in out.items():
        title = "clean accuracy" if attack == "none" else f"{attack.upper()} at {round(eps * 255, 2):g}/255"
        datasets = list(dict.fromkeys(r["dataset"] for r in recs))
        specs = list(dict.fromkeys(r["spec"] for r in recs))
        blocks.append((title, datasets, specs, {(r["dataset"], r["spec"]): r for r in recs}))
    return blocks


def format_table1(table: dict) -> str:
    """The Table 1 layout as text: per block, rows = datasets + average, two columns (Acc, Rob) per defense;
    cells 'accuracy % (difference to none)'."""
    sets = ", ".join(f"{d} ({m}, {r['n_images']} images)"
                     for d, m, r in zip(table["datasets"], table["models"], table["reports"]))
    lines = [f"paper protocol (non-adaptive), accuracy % (difference to the undefended model 'none'); {sets}"]
    for title, datasets, specs, recs in _blocks(table):
        width = {lab: max(15, -(-(len(lab) + 2) // 2)) for lab in specs}  # per defense: Acc and Rob columns
        dwidth = max(10, *(len(d) + 2 for d in datasets))
        lines += ["", title, f"{'':<{dwidth}}" + "".join(f"{lab:<{2 * width[lab]}}" for lab in specs).rstrip(),
                  f"{'dataset':<{dwidth}}" + "".join(f"{'Acc':<{width[lab]}}{'Rob':<{width[lab]}}"
                                                     for lab in specs).rstrip()]
        rule = "-" * len(lines[-1])
        lines.append(rule)
        for d in datasets:
            if d == "average":
                lines.append(rule)
            lines.append(f"{d:<{dwidth}}" + "".join(
                f"{_cell(recs[d, lab]['acc'], recs[d, lab]['delta_acc']):<{width[lab]}}"
                f"{_cell(recs[d, lab]['rob'], recs[d, lab]['delta_rob']):<{width[lab]}}" for lab in specs).rstrip())
    return "\n".join(lines)


def format_table1_markdown(table: dict) -> str:
    out = ["# Table 1 layout (paper protocol)", "", *_partial_note(table),
           "Attacks made on the undefended classifier, then each defense (non-adaptive: not a robustness claim). "
           "Cells: accuracy % (difference to the undefended model `none`). Datasets: "
           + ", ".join(f"`{d}` (model `{m}`, {r['n_images']} images, seed {r['seed']})"
                       for d, m, r in zip(table["datasets"], table["models"], table["reports"])) + "."]
    for title, datasets, specs, recs in _blocks(table):
        out += ["", f"## {title}", "", "| dataset | " + " | ".join(f"{lab} Acc | {lab} Rob" for lab in specs) + " |",
                "|---" * (2 * len(specs) + 1) + "|"]
        for d in datasets:
            name = "**average**" if d == "average" else d
            out.append(f"| {name} | " + " | ".join(
                f"{_cell(recs[d, lab]['acc'], recs[d, lab]['delta_acc'])} | "
                f"{_cell(recs[d, lab]['rob'], recs[d, lab]['delta_rob'])}" for lab in specs) + " |")
    settings = {k: v for r in table["reports"] for k, v in r.get("attack_settings", {}).items()}
    if settings:
        out += ["", "AutoAttack settings:", ""] + [f"- `{k}`: {json.dumps(v)}" for k, v in settings.items()]
    if table.get("notes"):
        out += ["", "Notes:", ""] + [f"- {note}" for note in table["notes"]]
    out += _backbone_lines([(r["model"], r.get("backbones") or {}) for r in table["reports"]])
    return "\n".join(out) + "\n"


def _backbone_lines(models: list[tuple[str, dict]]) -> list[str]:
    """The fine-tuned models' provenance as a Markdown table (nothing when there are none)."""
    rows = [(m, b, p) for m, backbones in models for b, p in backbones.items()]
    if not rows:
        return []
    out = ["", "## Fine-tuned models", "",
           "| model | column | method (source) | eps_train | attack steps | training data | images | epochs | "
           "last epoch loss | training s | weights sha256 |", "|---" * 11 + "|"]
    for m, b, p in rows:
        epochs = p.get("epochs") or [{}]
        out.append(f"| {m} | {b} | {p.get('method')} ({p.get('source')}) | {p.get('eps_255', 0):g}/255 | "
                   f"{p.get('attack_steps')} | {p.get('data')} | {p.get('n_images')} | {len(p.get('epochs') or [])} | "
                   f"{epochs[-1].get('loss', float('nan')):.4f} | {p.get('train_s')} | "
                   f"`{(p.get('checkpoint_sha256') or '')[:16]}` |")
    return out


def plot_table1(table: dict, folder: Path) -> list[Path]:
    """table1.png: one panel per block (clean, then each attack and eps), bars per defense column, one colour per
    dataset and the average (hatched). No rows: no plot."""
    if not table.get("table1"):
        return []
    require_extra("plots", ["matplotlib"], what="the report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = _blocks(table)
    panels = [("clean accuracy", "acc", blocks[0])] + [(b[0], "rob", b) for b in blocks if b[0] != "clean accuracy"]
    specs = blocks[0][2]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.75 * len(specs) + 3), 3.2 * len(panels)),
                             squeeze=False)
    for ax, (title, key, (_, datasets, _, recs)) in zip(axes[:, 0], panels):
        width = 0.8 / len(datasets)
        for j, d in enumerate(datasets):
            xs = [i + (j - (len(datasets) - 1) / 2) * width for i in range(len(specs))]
            ys = [100 * (recs[d, s][key] or 0) for s in specs]
            ax.bar(xs, ys, width * 0.95, color=f"C{j}", hatch="//" if d == "average" else "",
                   alpha=0.6 if d == "average" else 0.9, edgecolor="white", label=d)
        ax.set_xticks(range(len(specs)), specs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title, fontsize=9)
        _legend_outside(ax, title="dataset")
    fig.suptitle("Table 1 layout, paper protocol: " + ", ".join(
        f"{d} ({m})" for d, m in zip(table["datasets"], table["models"])), fontsize=9)
    fig.tight_layout()
    path = folder / "table1.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------------
# Plots: accuracy against eps (eps 0 = clean): grouped bars at one eps, lines over several; the adaptive
# protocol's PGD trajectory. Each defense keeps one colour and one marker in every plot; legends sit outside.
# ----------------------------------------------------------------------------------------------------------
MARKERS = "osD^vP*Xhp<>"
SERIES_STYLES = ("-", "--", ":", "-.")


def accuracy_series(report: dict) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """{defense spec: {series: [(eps, accuracy, stderr)] by eps, eps 0 = clean}}. Adaptive protocol: the worst
    case over the suite with "known" and "fresh" draws. Paper protocol: one series per attack ("clean" alone when
    no attack ran)."""
    adaptive = report["protocol"] == "adaptive"
    out: dict[str, dict[str, list]] = {}
    clean: dict[str, tuple] = {}
    for r in report["results"]:
        if adaptive and (r["protocol"] != "adaptive" or r["attack"] not in ("none", "worst")):
            continue
        lab = _spec(r)
        series = out.setdefault(lab, {})
        point = (0.0 if r["attack"] == "none" else r["eps"], r["accuracy"], r["stderr"])
        if r["attack"] == "none" and not adaptive:
            clean[lab] = point
        else:
            series.setdefault(r["draws"] if adaptive else r["attack"], []).append(point)
    for lab, point in clean.items():  # the paper protocol's clean row starts every attack's series
        for points in out[lab].values():
            points.append(point)
        if not out[lab]:
            out[lab]["clean"] = [point]
    return {lab: {name: sorted(points) for name, points in series.items()} for lab, series in out.items()}


def defense_styles(report: dict) -> dict[str, tuple[str, str]]:
    """{defense spec: (colour, marker)}, in the report's order: the same in every plot of a report."""
    specs = dict.fromkeys(_spec(r) for r in report["results"])
    return {lab: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, lab in enumerate(specs)}


def _legend_outside(ax, handles=None, labels=None, title=None):
    """The legend right of the axes, never over the data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                     title=title, title_fontsize=8, frameon=False)


def _title(report: dict, what: str) -> str:
    n = report["n_images"]
    return (f"{report['model']} on {report['dataset']}, {n} image{'s' if n != 1 else ''}, "
            f"{report['protocol']} protocol: {what}")


def plot_bars(report: dict, ax) -> None:
    """One eps: per defense, grouped bars: clean and robust (adaptive: the worst case; paper: each attack), known
    and fresh draws side by side (fresh hatched), each with its standard error and its value."""
    series = accuracy_series(report)
    adaptive = report["protocol"] == "adaptive"
    # each bar: (legend name, series (None: any, its first point is clean), point: 0 clean / -1 attacked, colour,
    # hatch)
    if adaptive:
        bars = [(f"{kind}, {draws} draws", draws, point, colour, "//" if draws == "fresh" else "")
                for kind, point, colour in (("clean", 0, "#4C72B0"), ("robust", -1, "#C44E52"))
                for draws in ("known", "fresh")]
    else:
        last = {name: pts[-1][0] for s in series.values() for name, pts in s.items()}
        attacks = [a for a in dict.fromkeys(n for s in series.values() for n in s) if a != "clean"]
        bars = [("clean", None, 0, "#4C72B0", "")] if any(r["attack"] == "none" for r in report["results"]) else []
        bars += [(f"{a.upper()} {last[a] * 255:g}/255", a, -1, f"C{i + 1}", "") for i, a in enumerate(attacks)]
    labels = list(series)
    width = 0.8 / len(bars)
    for j, (name, key, point, colour, hatch) in enumerate(bars):
        xs, ys, es = [], [], []
        for i, lab in enumerate(labels):
            pts = next(iter(series[lab].values()), None) if key is None else series[lab].get(key)
            if pts:
                xs.append(i + (j - (len(bars) - 1) / 2) * width)
                ys.append(100 * pts[point][1])
                es.append(100 * pts[point][2])
        ax.bar(xs, ys, width * 0.95, yerr=es, capsize=2, color=colour, hatch=hatch, alpha=0.55 if hatch else 0.9,
               edgecolor=colour if hatch else "white", label=name)
        for x, y, e in zip(xs, ys, es):  # the value above its error bar
            ax.annotate(f"{y:.0f}", (x, y + e), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("defense")
    ax.set_ylabel("accuracy % (± standard error)")
    ax.set_ylim(0, 112)
    ax.grid(axis="y", alpha=0.3)
    eps = sorted({r["eps"] for r in report["results"] if r["attack"] != "none"})
    what = f"eps {eps[0] * 255:g}/255" if eps else "clean accuracy"
    if adaptive:
        what += "; robust = correct under every attack"
    ax.set_title(_title(report, what), fontsize=9)
    _legend_outside(ax)


def plot_lines(report: dict, ax) -> None:
    """Several eps: accuracy against eps (eps 0 = clean), one colour and marker per defense, one line style per
    series (adaptive: known / fresh draws of the worst case; paper: each attack)."""
    from matplotlib.lines import Line2D

    series = accuracy_series(report)
    names = list(dict.fromkeys(name for s in series.values() for name in s))
    style = {name: SERIES_STYLES[i % len(SERIES_STYLES)] for i, name in enumerate(names)}
    styles = defense_styles(report)
    handles, labels = [], []
    for lab, per_series in series.items():
        colour, marker = styles[lab]
        for name, pts in per_series.items():
            ax.errorbar([e * 255 for e, _, _ in pts], [100 * a for _, a, _ in pts], yerr=[100 * s for _, _, s in pts],
                        color=colour, marker=marker, ls=style[name], ms=5, capsize=2, lw=1.5)
        handles.append(Line2D([], [], color=colour, marker=marker, ls="-"))
        labels.append(lab)
    if len(names) > 1:
        handles += [Line2D([], [], color="0.3", ls=style[n]) for n in names]
        labels += [f"{n} draws" for n in names] if report["protocol"] == "adaptive" else names
    _legend_outside(ax, handles, labels, title="defense" + (" / series" if len(names) > 1 else ""))
    ticks = sorted({e * 255 for s in series.values() for pts in s.values() for e, _, _ in pts})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("eps (/255); 0 = clean")
    ax.set_ylabel("accuracy % (± standard error)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(_title(report, "worst case over the suite" if report["protocol"] == "adaptive" else
                        "accuracy against eps"), fontsize=9)


def plot_steps(report: dict, fig) -> None:
    """The adaptive protocol's PGD trajectory: accuracy against steps, one panel per eps, the defenses' colours
    and markers, known draws solid and fresh dashed."""
    from matplotlib.lines import Line2D

    curves = report["steps_curves"]
    eps_values = sorted({c["eps"] for c in curves})
    styles = {lab: style for lab, style in defense_styles(report).items() if any(c["spec"] == lab for c in curves)}
    steps = sorted({k for c in curves for k in c["steps"]})
    axes = fig.subplots(1, len(eps_values), sharey=True, squeeze=False)[0]
    for ax, eps in zip(axes, eps_values):
        for c in curves:
            if c["eps"] == eps:
                colour, marker = styles[c["spec"]]
                ax.plot(c["steps"], [100 * a for a in c["accuracy"]], color=colour, marker=marker,
                        ls="-" if c["draws"] == "known" else "--", ms=4)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(steps, [str(k) for k in steps])
        ax.minorticks_off()
        ax.set_xlabel("exact PGD steps")
        ax.set_title(f"eps {eps * 255:g}/255", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy %")
    axes[0].set_ylim(-2, 102)
    handles = [Line2D([], [], color=colour, marker=marker) for colour, marker in styles.values()]
    handles += [Line2D([], [], color="0.3", ls=ls) for ls in ("-", "--")]
    _legend_outside(axes[-1], handles, list(styles) + ["known draws", "fresh draws"], title="defense / draws")
    fig.suptitle(_title(report, "PGD accuracy against steps"), fontsize=9)


def write_plots(report: dict, folder: Path) -> list[Path]:
    """acc_vs_eps.png (grouped bars at one eps, lines over several; clean included) and, in the adaptive protocol,
    acc_vs_steps.png (the PGD trajectory). No rows (a run interrupted before its first one): no plots."""
    if not report["results"]:
        return []
    require_extra("plots", ["matplotlib"], what="the report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({r["eps"] for r in report["results"] if r["attack"] != "none"}) > 1
    fig, ax = plt.subplots(figsize=(7.5, 4) if several else (max(6.0, 1.6 * len(accuracy_series(report)) + 3), 4))
    (plot_lines if several else plot_bars)(report, ax)
    written = [folder / "acc_vs_eps.png"]
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    if report.get("steps_curves"):
        fig = plt.figure(figsize=(4.5 * len({c["eps"] for c in report["steps_curves"]}) + 1.5, 3.8))
        plot_steps(report, fig)
        written.append(folder / "acc_vs_steps.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return written


def write_report(report: dict, folder: str | Path, stem: str = "report") -> list[Path]:
    """report.json, report.md and the plots in `folder` (created if missing); the paths written. A Table 1
    report (several datasets) gets one plot, table1.png."""
    folder = Path(folder)
    table1 = report.get("layout") == "table1"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
        paths[0].write_text(json.dumps(report, indent=2))
        paths[1].write_text(format_table1_markdown(report) if table1 else format_markdown(report))
    except OSError as err:
        raise SccError(f"could not write the report to {folder}: {err.strerror or err}") from None
    return paths + (plot_table1(report, folder) if table1 else write_plots(report, folder))

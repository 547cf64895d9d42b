"""The evaluation reports: the adaptive known / fresh table, the paper's Table 1 layout over several datasets,
Markdown, the two plots, and writing them to a folder that was checked before any attack ran.

    print(format_adaptive_table(report))
    print(format_table1(table))      # scc.eval.paper.run_datasets: datasets x defenses, Acc / Rob, delta, average
    write_report(report, "out/")     # report.json, report.md, acc_vs_eps.png, acc_vs_steps.png (Table 1: no plots)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..defenses import label_of
from ..errors import SccError, require_extra


# column order of every table: clean, the paper protocol's attacks, then the adaptive suite and its worst case
ATTACK_ORDER = ("none", "pgd", "cw", "pgd100", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "apgd", "autoattack",
                "eot-pgd", "bpda-pgd", "transfer-nocorrect", "square", "surrogate-pgd", "worst")


def _label(r: dict) -> str:
    return label_of(r["defense"], r["preset"])


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
        lab = _label(r)
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
            f"{_label(r)} {r['eps'] * 255:g}/255 {r['draws']} {100 * r['accuracy']:.1f}+-{100 * r['stderr']:.1f}"
            for r in worst))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    cols, text, eps_values = table_cells(report)
    out = [f"# Robust accuracy ({report['protocol']} protocol)", "",
           f"model `{report['model']}`, dataset `{report['dataset']}`, {report['n_images']} images, seed "
           f"{report['seed']}, {report.get('threads')} thread(s). Cells: accuracy % with known / fresh draws "
           "(paper rows: non-adaptive, one number).", "",
           "| defense | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lab, cells in text.items():
        out.append(f"| {lab} | " + " | ".join(cells.get(c, "-") for c in cols) + " |")
    costs = [r for r in report["results"] if r.get("attack_seconds_per_image") and r["draws"] != "fresh"]
    if costs:
        out += ["", "Attack cost, seconds per image: wall (CPU time of the process; on a shared machine the wall "
                "time includes waiting for the cores):", ""]
        out += [f"- {_label(r)} {_col_name(r)} @{r['eps'] * 255:g}/255: {r['attack_seconds_per_image']:.3f} "
                f"({(r.get('attack_cpu_seconds_per_image') or 0):.3f})" for r in costs]
    if report.get("sanity"):
        out += ["", "Sanity checks:", ""] + [f"- {f}" for f in report["sanity"]]
    if report.get("warning"):
        out += ["", f"**{report['warning']}**"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The paper's Table 1 layout: one block per (attack, eps); rows = datasets and their average; per defense the
# clean accuracy (Acc) and the robust accuracy (Rob), each with its difference to the undefended model ("none").
# ----------------------------------------------------------------------------------------------------------
def table1_rows(reports: list[dict]) -> list[dict]:
    """Flat records {"attack", "eps", "dataset" (or "average"), "defense" (label), "acc", "rob", "delta_acc",
    "delta_rob"} (accuracies in [0,1]; None where not measured; deltas against the "none" label when present)
    from paper-protocol reports, one per dataset. The average is the mean over the datasets (None if one lacks
    the cell)."""
    blocks = []
    for rep in reports:
        for r in rep["results"]:
            if r["attack"] != "none" and (r["attack"], r["eps"]) not in blocks:
                blocks.append((r["attack"], r["eps"]))
    blocks = blocks or [("none", 0.0)]
    labels = list(dict.fromkeys(_label(r) for rep in reports for r in rep["results"]))
    out = []
    for attack, eps in blocks:
        per_dataset = []
        for rep in reports:
            acc = {_label(r): r["accuracy"] for r in rep["results"] if r["attack"] == "none"}
            rob = {_label(r): r["accuracy"] for r in rep["results"] if (r["attack"], r["eps"]) == (attack, eps)}
            per_dataset.append((rep["dataset"], {lab: (acc.get(lab), rob.get(lab) if attack != "none" else None)
                                                 for lab in labels}))
        mean = lambda vals: None if any(v is None for v in vals) else sum(vals) / len(vals)
        average = {lab: tuple(mean([cells[lab][i] for _, cells in per_dataset]) for i in (0, 1)) for lab in labels}
        for dataset, cells in per_dataset + [("average", average)]:
            base = cells.get("none", (None, None))
            for lab in labels:
                a, b = cells[lab]
                diff = lambda v, ref: None if v is None or ref is None or lab == "none" else v - ref
                out.append({"attack": attack, "eps": eps, "dataset": dataset, "defense": lab, "acc": a, "rob": b,
                            "delta_acc": diff(a, base[0]), "delta_rob": diff(b, base[1])})
    return out


def _cell(value: float | None, delta: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + ("" if delta is None else f" ({100 * delta:+.1f})")


def _blocks(table: dict) -> list[tuple[str, list[str], list[str], dict]]:
    """(title, datasets, labels, {(dataset, label): record}) per (attack, eps) block of a Table 1 report."""
    out = {}
    for r in table["table1"]:
        out.setdefault((r["attack"], r["eps"]), []).append(r)
    blocks = []
    for (attack, eps), recs in out.items():
        title = "clean accuracy" if attack == "none" else f"{attack.upper()} at {round(eps * 255, 2):g}/255"
        datasets = list(dict.fromkeys(r["dataset"] for r in recs))
        labels = list(dict.fromkeys(r["defense"] for r in recs))
        blocks.append((title, datasets, labels, {(r["dataset"], r["defense"]): r for r in recs}))
    return blocks


def format_table1(table: dict) -> str:
    """The Table 1 layout as text: per block, rows = datasets + average, two columns (Acc, Rob) per defense;
    cells 'accuracy % (difference to none)'."""
    sets = ", ".join(f"{d} ({m}, {r['n_images']} images)"
                     for d, m, r in zip(table["datasets"], table["models"], table["reports"]))
    lines = [f"paper protocol (non-adaptive), accuracy % (difference to the undefended model 'none'); {sets}"]
    for title, datasets, labels, recs in _blocks(table):
        width = {lab: max(15, -(-(len(lab) + 2) // 2)) for lab in labels}  # per defense: Acc and Rob columns
        dwidth = max(10, *(len(d) + 2 for d in datasets))
        lines += ["", title, f"{'':<{dwidth}}" + "".join(f"{lab:<{2 * width[lab]}}" for lab in labels).rstrip(),
                  f"{'dataset':<{dwidth}}" + "".join(f"{'Acc':<{width[lab]}}{'Rob':<{width[lab]}}"
                                                     for lab in labels).rstrip()]
        rule = "-" * len(lines[-1])
        lines.append(rule)
        for d in datasets:
            if d == "average":
                lines.append(rule)
            lines.append(f"{d:<{dwidth}}" + "".join(
                f"{_cell(recs[d, lab]['acc'], recs[d, lab]['delta_acc']):<{width[lab]}}"
                f"{_cell(recs[d, lab]['rob'], recs[d, lab]['delta_rob']):<{width[lab]}}" for lab in labels).rstrip())
    return "\n".join(lines)


def format_table1_markdown(table: dict) -> str:
    out = ["# Table 1 layout (paper protocol)", "",
           "Attacks made on the undefended classifier, then each defense (non-adaptive: not a robustness claim). "
           "Cells: accuracy % (difference to the undefended model `none`). Datasets: "
           + ", ".join(f"`{d}` (model `{m}`, {r['n_images']} images, seed {r['seed']})"
                       for d, m, r in zip(table["datasets"], table["models"], table["reports"])) + "."]
    for title, datasets, labels, recs in _blocks(table):
        out += ["", f"## {title}", "", "| dataset | " + " | ".join(f"{lab} Acc | {lab} Rob" for lab in labels) + " |",
                "|---" * (2 * len(labels) + 1) + "|"]
        for d in datasets:
            name = "**average**" if d == "average" else d
            out.append(f"| {name} | " + " | ".join(
                f"{_cell(recs[d, lab]['acc'], recs[d, lab]['delta_acc'])} | "
                f"{_cell(recs[d, lab]['rob'], recs[d, lab]['delta_rob'])}" for lab in labels) + " |")
    settings = {k: v for r in table["reports"] for k, v in r.get("attack_settings", {}).items()}
    if settings:
        out += ["", "AutoAttack settings:", ""] + [f"- `{k}`: {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(out) + "\n"


def write_plots(report: dict, folder: Path) -> list[Path]:
    """acc_vs_eps.png (robust accuracy vs eps per defense and attack) and acc_vs_steps.png (PGD trajectory)."""
    require_extra("adaptive", ["matplotlib"], what="the report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in report["results"] if r["attack"] != "none"]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(4 * max(1, len(labels)), 3.4), squeeze=False)
    for ax, lab in zip(axes[0], labels):
        series = {}
        for r in rows:
            if _label(r) == lab:
                series.setdefault((r["attack"], r["draws"] or r["protocol"]), []).append(r)
        for (attack, draws), rs in series.items():
            rs = sorted(rs, key=lambda r: r["eps"])
            style = "-" if draws in ("known", "paper") else "--"
            ax.errorbar([r["eps"] * 255 for r in rs], [100 * r["accuracy"] for r in rs],
                        yerr=[100 * r["stderr"] for r in rs], fmt="o" + style, ms=3, capsize=2,
                        label=f"{attack} ({draws})", lw=2.5 if attack == "worst" else 1)
        ax.set_title(lab)
        ax.set_xlabel("eps (/255)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-2, 102)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = folder / "acc_vs_eps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    curves = report.get("steps_curves", [])
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for c in curves:
            ax.plot(c["steps"], [100 * a for a in c["accuracy"]], "o-" if c["draws"] == "known" else "o--", ms=3,
                    label=f"{c['defense']} {c['eps'] * 255:g}/255 ({c['draws']})")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("exact PGD steps")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / "acc_vs_steps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(report: dict, folder: str | Path, stem: str = "report") -> list[Path]:
    """report.json, report.md and the plots in `folder` (created if missing); the paths written. A Table 1
    report (several datasets) gets the JSON and the Markdown only."""
    folder = Path(folder)
    table1 = report.get("layout") == "table1"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
        paths[0].write_text(json.dumps(report, indent=2))
        paths[1].write_text(format_table1_markdown(report) if table1 else format_markdown(report))
    except OSError as err:
        raise SccError(f"could not write the report to {folder}: {err.strerror or err}") from None
    return paths if table1 else paths + write_plots(report, folder)

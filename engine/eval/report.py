"""The adaptive evaluation's report: the known / fresh table, Markdown, the two plots, and writing them to a folder
that was checked before any attack ran.

    print(format_adaptive_table(report))
    write_report(report, "out/")     # report.json, report.md, acc_vs_eps.png, acc_vs_steps.png
"""
from __future__ import annotations

import json
from pathlib import Path

from ..defenses import label_of
from ..errors import SccError, require_extra


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
    order = {a: i for i, a in enumerate(("none", "pgd", "cw", "pgd100", "apgd-ce", "apgd-dlr", "eot-pgd",
                                         "bpda-pgd", "transfer-nocorrect", "square", "worst"))}
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
    """report.json, report.md and the plots in `folder` (created if missing); the paths written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
        paths[0].write_text(json.dumps(report, indent=2))
        paths[1].write_text(format_markdown(report))
    except OSError as err:
        raise SccError(f"could not write the report to {folder}: {err.strerror or err}") from None
    return paths + write_plots(report, folder)

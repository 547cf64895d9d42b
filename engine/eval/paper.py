"""Robustness evaluation in the TTC protocol (the paper's): attacks against the undefended classifier, then each
defense on the result. Non-adaptive: the attack never sees the defense, so these numbers reproduce the paper's
tables and are not a robustness claim (scc.eval.adaptive is).

    report = scc.eval.paper.run(model="scc-tiny-digits", dataset="digits", defenses=["none", "ttc", "scc"],
                                attacks=[("none", 0), ("pgd", 1/255), ("pgd", 4/255)])
    print(format_table(report))
    table = run_datasets([("digits", "scc-tiny-digits"), ("fashion", "scc-tiny-fashion")], defenses=..., attacks=...)
    print(scc.eval.report.format_table1(table))          # the paper's Table 1 layout: datasets x defenses, average

Adversarial images are made once per (attack, eps) against the plain classifier and shared by every defense.
`s_per_image` times the defense alone (not the attack), on the chosen backend and dtype.

Attacks (scc.eval.options.PAPER_ATTACKS): pgd and cw (`attack_steps`, default 10, step 1/255), pgd100 (PGD-100,
step 1/255), AutoAttack's components one at a time (apgd-ce, apgd-dlr, apgd-t, fab-t, square) and two AutoAttack
sequences in which each component attacks only the images the earlier ones left correct: `apgd` (TTC's subset:
APGD-CE then APGD-DLR, 100 iterations, 1 restart) and `autoattack` (the standard version: APGD-CE, APGD-T with 9
targets, FAB-T with 9 targets, Square with 5000 queries; scc.attacks.autoattack.Settings). A component whose loss
needs more classes than the task has (DLR: 3, targeted DLR: 4) is skipped with a note in the report. The settings
of every AutoAttack attack are written into the report (`attack_settings`), with the undefended classifier's
robust count after each component (`autoattack_log`). Every row says `"protocol": "paper"` and `"draws": null`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from ..attacks import attack as run_attack
from ..attacks.autoattack import COMPONENTS, Settings, run_component, run_sequence, skipped as skip_reason
from ..backends import make_runner
from ..data import classifier_for, load_dataset
from ..defenses import DEFENSES, defend, spec_of, split_spec
from ..errors import SccError
from ..models import preprocessing_of
from ..precision import dtype_name
from ..provenance import hardware, versions
from ..timing import timed_call
from .options import NON_ADAPTIVE_WARNING, PAPER_ATTACKS, SEQUENCES, stderr
from .suite import on_backbone


def steps_of(attack: str, attack_steps: int, settings: Settings) -> int | None:
    """The iteration (or query) budget a row records for `attack` (None for a sequence: see attack_settings)."""
    return {"none": 0, "pgd": attack_steps, "cw": attack_steps, "pgd100": 100, "apgd-ce": settings.apgd_steps,
            "apgd-dlr": settings.apgd_steps, "apgd-t": settings.apgd_steps, "fab-t": settings.fab_steps,
            "square": settings.square_queries}.get(attack)


def run(model: str = "scc-tiny-digits", pretrained: str | None = None, dataset: str = "digits",
        defenses: Sequence[str] = ("none", "ttc", "scc"), attacks: Sequence[tuple[str, float]] = (("none", 0.0),),
        n_images: int | None = None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
        attack_steps: int = 10, progress: bool = True, templates: Sequence[str] | None = None,
        backend: str = "eager", dtype: torch.dtype = torch.float32, settings: Settings = Settings(),
        keep: Callable[[Callable[[], tuple]], None] | None = None,
        backbones: Mapping[str, Mapping] | None = None) -> dict:
    """Clean/robust accuracy and per-image defense time on `backend` (scc.backends); returns the JSON-ready
    result dict. `defenses` are specs, config overrides included ('scc:semantic=off'). `keep(snapshot)` is
    called once before the attacks: snapshot() -> (report of the rows finished so far, their number, the rows of
    the whole run, the missing rows), what a run cut short writes (scc.cli.interrupts).

    `backbones`: fine-tuned versions of `model`, {name: {"pretrained": checkpoint, "provenance": {...}}}. A
    defense spec `fare` is that model alone, `fare+ttc` TTC on it; both are attacked on the fine-tuned model
    itself (white-box, like the undefended column on the original), and TTC's tau gate (also SCC's warm-up) reads
    the frozen original model, as TTC's code does for fine-tuned victims."""
    for key, value in (("n_images", n_images), ("batch_size", batch_size), ("attack_steps", attack_steps)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SccError(f"{key} must be a positive integer" + (" or None (all images)" if key == "n_images" else "")
                           + f", got {value!r}")
    for attack_name, _ in attacks:
        if attack_name != "none" and attack_name not in PAPER_ATTACKS:
            raise SccError(f"unknown attack {attack_name!r}; choose from {', '.join(PAPER_ATTACKS)}")
    backbones = dict(backbones or {})
    parts = {spec: split_backbone(spec, backbones) for spec in defenses}
    data = load_dataset(dataset, preprocessing_of(model), n_images)
    clf = classifier_for(data, model, pretrained, templates, device, seed)
    classifiers = {None: clf}

    def classifier_of(backbone: str | None):
        if backbone not in classifiers:
            tuned = classifier_for(data, model, backbones[backbone]["pretrained"], templates, device, seed)
            tuned.tau_reference = clf  # TTC's gate on the frozen original (scc.defenses.ttc)
            classifiers[backbone] = tuned
        return classifiers[backbone]
    for backbone, inner in parts.values():  # a defense this model cannot run fails before the first attack
        DEFENSES[split_spec(inner)[0]].check(clf)
    x_all, y_all = data.images.to(device), data.targets.to(device)
    gen = torch.Generator(device=x_all.device).manual_seed(seed)
    results, skipped, runners, aa_settings, aa_log = [], [], {}, {}, []
    header = {"protocol": "paper", "model": model, "pretrained": pretrained, "dataset": data.name,
              "n_images": len(y_all), "device": str(device), "backend": backend, "dtype": dtype_name(dtype),
              "seed": seed, "hardware": hardware(device), "versions": versions(), "threads": torch.get_num_threads()}
    if backbones:
        header["backbones"] = {b: dict(v.get("provenance") or {"checkpoint": v["pretrained"]})
                               for b, v in backbones.items()}

    def report_of(rows: list[dict]) -> dict:
        report = {**header, "results": list(rows)}
        for key, value in (("attack_settings", aa_settings), ("autoattack_log", aa_log), ("skipped", skipped)):
            if value:
                report[key] = value
        if any(r["attack"] != "none" for r in rows):
            report["warning"] = NON_ADAPTIVE_WARNING
        return report

    if keep is not None:  # rows are finished in this order: attack by attack, each defense on it
        planned = [f"{spec} {'clean' if a == 'none' else f'{a} {e * 255:g}/255'}" for a, e in attacks
                   if not (a in COMPONENTS and skip_reason(a, clf.num_classes)) for spec in defenses]
        keep(lambda: (report_of(results), len(results), len(planned), planned[len(results):]))
    for attack_name, eps in attacks:
        why = skip_reason(attack_name, clf.num_classes) if attack_name in COMPONENTS else None
        if why:
            skipped.append(f"{attack_name} skipped at eps={eps:.4f}: {why}")
            continue
        if attack_name in COMPONENTS or attack_name in SEQUENCES:
            aa_settings[attack_name] = settings.describe(SEQUENCES.get(attack_name, (attack_name,)))
        log: dict = {}
        adversarial: dict = {}  # backbone -> the batches attacked on that model (the original: None)

        def attacked(backbone: str | None, target) -> list:
            # the original's attacks draw from `gen` in attack order, as without backbones; each fine-tuned
            # model's from its own generator with the same seed
            g = gen if backbone is None else torch.Generator(device=x_all.device).manual_seed(seed)
            batches = []
            with tqdm(range(0, len(y_all), batch_size), desc=f"attack {attack_name} eps={eps:.4f}"
                      + (f" on {backbone}" if backbone else ""),
                      disable=not progress or attack_name == "none", leave=False) as starts:
                for i in starts:
                    x, y = x_all[i: i + batch_size], y_all[i: i + batch_size]
                    if attack_name in SEQUENCES:
                        x, part = run_sequence(target, x, y, eps, SEQUENCES[attack_name], settings, seed=seed)
                        for key, value in part.items():  # counts add up over batches; a skip reason is kept once
                            if backbone is None:
                                log[key] = log.get(key, 0) + value if isinstance(value, int) else value
                    elif attack_name in COMPONENTS:
                        x = run_component(attack_name, target, x, y, eps, settings, seed=seed)
                    elif attack_name == "pgd100":
                        x = run_attack(target, x, y, "pgd", eps=eps, alpha=1 / 255, steps=100, generator=g)
                    elif attack_name != "none":
                        x = run_attack(target, x, y, attack_name, eps=eps, alpha=1 / 255, steps=attack_steps,
                                       generator=g)
                    batches.append((x, y))
            return batches

        for backbone in dict.fromkeys(b for b, _ in parts.values()):
            adversarial[backbone] = attacked(backbone, classifier_of(backbone))
        if log:
            aa_log.append({"attack": attack_name, "eps": eps, **log})
            skipped += [f"{attack_name} at eps={eps:.4f}: {v}" for v in log.values() if isinstance(v, str)]
        for spec in defenses:
            backbone, inner = parts[spec]
            name, preset = split_spec(inner)
            batches = adversarial[backbone]
            if spec not in runners:  # built (and compiled) once per defense, whatever the attacks
                defended = defend(classifier_of(backbone), name, preset=preset, seed=seed)
                runners[spec] = defended, make_runner(defended, backend, min(batch_size, len(y_all)), dtype=dtype)
            defended, runner = runners[spec]
            correct, seconds, lo = 0, 0.0, 0
            with tqdm(batches, desc=f"{spec} on {attack_name}", disable=not progress, leave=False) as bar:
                for x, y in bar:
                    keys = range(lo, lo + len(y))  # image i's draws come from key i, its dataset index
                    with torch.no_grad():  # the draws are part of the defense's time, as in production
                        t, logits = timed_call(lambda: runner(x, defended.draws(x, keys)), x.device)
                    lo += len(y)
                    seconds += t
                    correct += (logits.argmax(1) == y).sum().item()
            acc = correct / len(y_all)
            if backbone is not None:  # the row's spec is "fare" or "fare+ttc" (report tables read spec_of)
                name = on_backbone(backbone, name)
            results.append({"defense": name, "preset": preset, "backend": backend, "dtype": dtype_name(dtype),
                            "attack": attack_name, "eps": eps,
                            "accuracy": acc, "s_per_image": seconds / len(y_all), "protocol": "paper",
                            "draws": None, "steps": steps_of(attack_name, attack_steps, settings),
                            "stderr": stderr(acc, len(y_all)),
                            **({"backbone": backbone, "test_time_defense": inner} if backbone else {})})
    return report_of(results)


def split_backbone(spec: str, backbones: Mapping[str, Mapping]) -> tuple[str | None, str]:
    """'fare+ttc' -> ('fare', 'ttc'); 'fare' -> ('fare', 'none'); 'ttc' -> (None, 'ttc'); SccError for a
    fine-tuned model not in `backbones`."""
    head, plus, rest = str(spec).partition("+")
    if plus or head in backbones:
        if head not in backbones:
            raise SccError(f"{spec!r}: no fine-tuned model {head!r} was given (known: {', '.join(backbones) or 'none'})")
        return head, rest or "none"
    return None, spec


def run_datasets(pairs: Sequence[tuple[str, str]], progress: bool = True,
                 log: Callable[[str], None] | None = None, keep: Callable[[Callable[[], tuple]], None] | None = None,
                 backbones: Mapping[str, Mapping[str, Mapping]] | None = None, notes: Sequence[str] = (),
                 **kwargs) -> dict:
    """`run` on each (dataset, model) pair with the same defenses, attacks and settings: the paper's Table 1.
    Returns {"protocol": "paper", "layout": "table1", "datasets", "models", "reports": [one `run` report each],
    "table1": scc.eval.report.table1_rows(...)}. `keep`: as in `run`, over every dataset. `backbones`: per model,
    its fine-tuned versions (`run`'s argument); `notes`: sentences the report states (caveats)."""
    from .report import table1_rows

    if not pairs:
        raise SccError("no dataset given; e.g. --dataset digits,fashion")
    for dataset, model in pairs:  # a bad name or a missing folder fails before the first dataset's attacks
        load_dataset(dataset, preprocessing_of(model), 1)

    def table_of(done: list[dict]) -> dict:
        table = {"protocol": "paper", "layout": "table1", "datasets": [r["dataset"] for r in done],
                 "models": [r["model"] for r in done], "reports": done, "table1": table1_rows(done)}
        if notes:
            table["notes"] = list(notes)
        if any("warning" in r for r in done):
            table["warning"] = NON_ADAPTIVE_WARNING
        return table

    reports, under_way = [], []  # under_way: each dataset's snapshot, registered by its `run`
    if keep is not None:
        def snapshot():
            now = [s() for s in under_way[len(reports):]]  # the dataset under way, once its attacks began
            rows = sum(len(r["results"]) for r in reports)
            left = pairs[len(reports) + len(now):]
            per_dataset = max([t for _, _, t, _ in now] or [len(kwargs.get("defenses", ())) *
                                                             len(kwargs.get("attacks", ()))])
            missing = [f"{r['dataset']}: {m}" for r, _, _, ms in now for m in ms] + [f"{d}: every row"
                                                                                     for d, _ in left]
            return (table_of(reports + [r for r, *_ in now]), rows + sum(n for _, n, _, _ in now),
                    rows + sum(t for _, _, t, _ in now) + len(left) * per_dataset, missing)
        keep(snapshot)
    for dataset, model in pairs:
        if log is not None:
            log(f"{dataset} on {model}")
        reports.append(run(model=model, dataset=dataset, progress=progress, keep=under_way.append,
                           backbones=(backbones or {}).get(model), **kwargs))
    return table_of(reports)


def format_table(report: dict) -> str:
    """Rows = defenses, columns = clean / each attack accuracy, then seconds per image."""
    cols = []
    for r in report["results"]:
        key = (r["attack"], r["eps"])
        if key not in cols:
            cols.append(key)
    rows: dict[str, dict] = {}
    for r in report["results"]:
        spec = spec_of(r["defense"], r["preset"])
        rows.setdefault(spec, {})[(r["attack"], r["eps"])] = r
    names = ["clean" if a == "none" else f"{a.upper()} {round(e * 255, 2):g}/255" for a, e in cols]
    width = max([14] + [len(spec) + 2 for spec in rows])
    head = f"{'defense':<{width}}" + "".join(f"{n:>{max(14, len(n) + 2)}}" for n in names) + f"{'s/image':>11}"
    lines = [head, "-" * len(head)]
    for spec, cells in rows.items():
        accs = "".join(f"{100 * cells[c]['accuracy']:>{max(14, len(n) + 2) - 1}.1f}%" if c in cells
                       else f"{'-':>{max(14, len(n) + 2)}}" for c, n in zip(cols, names))
        spi = sum(c["s_per_image"] for c in cells.values()) / len(cells)
        lines.append(f"{spec:<{width}}{accs}{spi:>11.4f}")
    return "\n".join(lines)

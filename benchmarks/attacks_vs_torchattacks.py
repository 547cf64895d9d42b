"""scc.attacks against torchattacks on identical inputs: each AutoAttack component and the standard sequence, at the
official settings, on the bundled models (the undefended classifiers: deterministic, so both see the same function).

    python benchmarks/attacks_vs_torchattacks.py --images 200 \\
        --out benchmarks/results/attacks-vs-torchattacks.json
    python benchmarks/attacks_vs_torchattacks.py --images 16 --queries 200 --steps 20     # a quick look

Per (model, eps, attack): robust accuracy of ours and of torchattacks (same seed), their difference in standard
errors, the fraction of adversarial images equal to 1e-6, and the seconds each took (same process, one thread,
alternating which goes first). torchattacks settings: APGD(steps, n_restarts=1, loss), APGDT(steps, n_classes=10:
9 targets), FAB(steps, multi_targeted=True, n_classes=10: 9 targets), Square(n_queries, p_init=0.8,
resc_schedule=False). Its sequence is built here from those components, each on the images still correct (as the
official run_standard_evaluation does; torchattacks' own AutoAttack class uses 10 iterations). Needs the
torchattacks, installed on its own (`pip install torchattacks==3.5.1`, best in a separate environment: it pins
requests~=2.25.1, so it is no extra of scc).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import scc
from scc.attacks import STANDARD, Settings, run_component, run_sequence
from scc.data import load_dataset
from scc.errors import missing_modules
from scc.provenance import hardware, versions


def theirs(name: str, model, x, y, eps: float, s: Settings, seed: int):
    import torchattacks

    n_classes = s.apgd_targets + 1
    if name in ("apgd-ce", "apgd-dlr"):
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=s.apgd_steps, n_restarts=s.apgd_restarts,
                                 loss=name[5:], seed=seed)(x, y)
    if name == "apgd-t":
        return torchattacks.APGDT(model, norm="Linf", eps=eps, steps=s.apgd_steps, n_restarts=s.apgd_restarts,
                                  n_classes=n_classes, seed=seed)(x, y)
    if name == "fab-t":
        return torchattacks.FAB(model, norm="Linf", eps=eps, steps=s.fab_steps, n_restarts=s.fab_restarts,
                                multi_targeted=True, n_classes=s.fab_targets + 1, seed=seed)(x, y)
    return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=s.square_queries, p_init=s.square_p_init,
                               n_restarts=s.square_restarts, resc_schedule=s.square_rescale_schedule, seed=seed)(x, y)


def their_sequence(model, x, y, eps, s: Settings, seed: int):
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    out = x.clone()
    for name in STANDARD:
        idx = robust.nonzero().flatten()
        if not len(idx):
            break
        adv = theirs(name, model, x[idx], y[idx], eps, s, seed)
        with torch.no_grad():
            fooled = model(adv).argmax(1) != y[idx]
        robust[idx[fooled]] = False
        out[idx[fooled]] = adv[fooled]
    return out


def accuracy(model, adv, y) -> float:
    with torch.no_grad():
        return (model(adv).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="scc-tiny-digits,scc-tiny-fashion")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--eps", default="4/255")
    p.add_argument("--steps", type=int, default=100, help="APGD and FAB iterations (official: 100)")
    p.add_argument("--queries", type=int, default=5000, help="Square queries (official: 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if missing_modules(["torchattacks"]):
        raise SystemExit("attacks_vs_torchattacks: torchattacks is not installed; pip install torchattacks==3.5.1 "
                         "(in a separate environment: it pins requests~=2.25.1)")
    torch.set_num_threads(1)
    from scc.eval.options import parse_eps_list

    settings = Settings(apgd_steps=args.steps, fab_steps=args.steps, square_queries=args.queries)
    load_start = os.getloadavg()
    rows = []
    for model_name in args.models.split(","):
        clf = scc.load(model_name)
        data = load_dataset(scc.models.bundled_dataset(model_name), clf.preprocess, args.images)
        x, y = data.images, data.targets
        se = lambda p: math.sqrt(max(p * (1 - p), 1.0 / len(y)) / len(y))  # floored at 1/n: never zero
        for eps in parse_eps_list(args.eps):
            clean = accuracy(clf, x, y)
            for k, name in enumerate(list(STANDARD[:1]) + ["apgd-dlr"] + list(STANDARD[1:]) + ["autoattack"]):
                ours_fn = (lambda: run_sequence(clf, x, y, eps, STANDARD, settings, args.seed)[0]) \
                    if name == "autoattack" else (lambda: run_component(name, clf, x, y, eps, settings, args.seed))
                theirs_fn = (lambda: their_sequence(clf, x, y, eps, settings, args.seed)) if name == "autoattack" \
                    else (lambda: theirs(name, clf, x, y, eps, settings, args.seed))
                order = [("ours", ours_fn), ("torchattacks", theirs_fn)]
                timed = {}
                for who, fn in (order if k % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    adv = fn()
                    timed[who] = (time.perf_counter() - t0, adv)
                a_ours, a_theirs = accuracy(clf, timed["ours"][1], y), accuracy(clf, timed["torchattacks"][1], y)
                same = ((timed["ours"][1] - timed["torchattacks"][1]).flatten(1).abs().amax(1) <= 1e-6)
                row = {"model": model_name, "dataset": data.name, "n": len(y), "eps": eps, "attack": name,
                       "clean": clean, "ours": a_ours, "torchattacks": a_theirs, "stderr": se(a_theirs),
                       "diff_in_stderr": (a_ours - a_theirs) / se(a_theirs),
                       "identical_images": same.float().mean().item(),
                       "ours_wall_s": timed["ours"][0], "torchattacks_wall_s": timed["torchattacks"][0]}
                rows.append(row)
                print(f"{model_name} eps={eps * 255:g}/255 {name:<10} ours {100 * a_ours:5.1f}  torchattacks "
                      f"{100 * a_theirs:5.1f}  ({row['diff_in_stderr']:+.2f} se)  identical {100 * row['identical_images']:5.1f}%"
                      f"  {row['ours_wall_s']:7.1f}s / {row['torchattacks_wall_s']:7.1f}s", flush=True)
    report = {"command": " ".join([os.path.basename(sys.executable), "benchmarks/attacks_vs_torchattacks.py"]
                                  + (argv if argv is not None else sys.argv[1:])),
              "settings": settings.describe(("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")),
              "threads": 1, "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "hardware": hardware("cpu"), "versions": versions(extra=("torchattacks",)), "rows": rows,
              "within_one_stderr": all(abs(r["diff_in_stderr"]) <= 1 for r in rows)}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if report["within_one_stderr"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Validation study behind scc-tiny-fashion's defaults (README "The bundled model `scc-tiny-fashion`").

    OMP_NUM_THREADS=1 python notes/fashion_validation.py tau --split fashion-val --images 1000
    OMP_NUM_THREADS=1 python notes/fashion_validation.py views --split fashion-val --images 500 --rtpt
    OMP_NUM_THREADS=1 python notes/fashion_validation.py pair --split fashion-val --images 2000
    OMP_NUM_THREADS=1 python notes/fashion_validation.py rtpt --split fashion-val --images 300

`tau`: TTC's tau = ||f(x + d0) - f(x)|| / ||f(x)|| on clean vs PGD-10 (eps 4/255, alpha 1/255, on the undefended
model) images: mean, median, quantiles, fraction below tau_thres = 0.2, and the best single threshold.
`views`: clean / PGD-10 accuracy of TTC and SCC with candidate view sets (the paper's flips, the digits model's
zoom) and of R-TPT with and without flips. `pair`: TTC vs SCC image by image, clean and PGD-10 1/255.
`rtpt`: clean accuracy of R-TPT variants (no tuning step, no flips, no AugMix, milder crops). Every modelling choice was made with `--split fashion-val` (5000 images
held out of the training split; needs the Debian package dataset-fashion-mnist); `--split fashion` (the shipped
test images) only reports.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import scc
from scc.attacks import pgd
from scc.data import load_dataset
from scc.defenses.ttc import TTC_DRAWS, TTCConfig, counterattack
from scc.draws import make_draws


def attacked(clf, x, y, eps, seed=0, batch=250):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([pgd(clf, x[i: i + batch], y[i: i + batch], eps=eps, alpha=1 / 255, steps=10, generator=gen)
                      for i in range(0, len(y), batch)])


def taus(clf, x, seed=0, batch=250):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i: i + batch]
        out.append(counterattack(clf, xb, TTCConfig(), **make_draws(TTC_DRAWS, None, xb, gen))[1].detach())
    return torch.cat(out)


def summary(t: torch.Tensor) -> dict:
    q = torch.quantile(t, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    return {"mean": round(t.mean().item(), 4), "median": round(q[2].item(), 4),
            "q05_q25_q75_q95": [round(v, 4) for v in q[[0, 1, 3, 4]].tolist()],
            "min_max": [round(t.min().item(), 4), round(t.max().item(), 4)],
            "frac_below_0.2": round((t < 0.2).float().mean().item(), 4)}


def cmd_tau(clf, data, args):
    x, y = data.images, data.targets
    adv = attacked(clf, x, y, 4 / 255)
    with torch.no_grad():
        acc = {"clean": (clf(x).argmax(1) == y).float().mean().item(), "pgd4": (clf(adv).argmax(1) == y).float().mean().item()}
    tc, ta = taus(clf, x), taus(clf, adv)
    # TTC's rule "adversarial iff tau < t": the best single t (balanced accuracy over the two sets), and the AUROC
    # of -tau; then the opposite rule "adversarial iff tau > t" for comparison.
    grid = torch.unique(torch.cat([tc, ta]))
    bal = [((ta < t).float().mean() + (tc >= t).float().mean()).item() / 2 for t in grid]
    rev = [((ta > t).float().mean() + (tc <= t).float().mean()).item() / 2 for t in grid]
    auroc_low = ((ta[:, None] < tc[None, :]).float().mean() + 0.5 * (ta[:, None] == tc[None, :]).float().mean()).item()
    best, best_rev = int(np.argmax(bal)), int(np.argmax(rev))
    print(json.dumps({"split": data.name, "images": len(y), "undefended_accuracy": acc, "tau_clean": summary(tc),
                      "tau_pgd4": summary(ta),
                      "ttc_rule_tau_below_t": {"auroc": round(auroc_low, 4), "best_t": round(grid[best].item(), 4),
                                               "best_balanced_accuracy": round(bal[best], 4)},
                      "opposite_rule_tau_above_t": {"auroc": round(1 - auroc_low, 4),
                                                    "best_t": round(grid[best_rev].item(), 4),
                                                    "best_balanced_accuracy": round(rev[best_rev], 4)}}, indent=2))


def accuracy(defended, x, y, batch=250):
    with torch.no_grad():
        return sum((defended(x[i: i + batch]).argmax(1) == y[i: i + batch]).sum().item()
                   for i in range(0, len(y), batch)) / len(y)


def cmd_views(clf, data, args):
    x, y = data.images, data.targets
    sets = {"clean": x, "pgd1": attacked(clf, x, y, 1 / 255), "pgd4": attacked(clf, x, y, 4 / 255, seed=1)}
    candidates = {
        "none": ("none", {}),
        "ttc": ("ttc", {}),
        "scc paper views (id, flip, noise, flip+noise; sigma 0.01)": ("scc", {}),
        "scc zoom views (id, zoom0.85, noise, zoom0.85+noise; sigma 0.02)":
            ("scc", {"views": ("id", "zoom0.85", "noise", "zoom0.85+noise"), "sigma": 0.02}),
        "scc paper views, sigma 0.02": ("scc", {"sigma": 0.02}),
        "scc-latency paper views": ("scc-latency", {}),
    }
    if args.rtpt:
        candidates["rtpt (flips)"] = ("rtpt", {"flip": True})
        candidates["rtpt (no flips)"] = ("rtpt", {"flip": False})
    print(f"{data.name}, {len(y)} images; PGD-10 against the undefended model")
    for label, (name, overrides) in candidates.items():
        defended = scc.defend(clf, name, seed=0, **overrides)
        accs = {k: accuracy(defended, v, y) for k, v in sets.items()}
        print(f"{label:<66}" + "".join(f"{k} {100 * a:5.1f}%  " for k, a in accs.items()), flush=True)


def cmd_pair(clf, data, args):
    x, y = data.images, data.targets
    sets = {"clean": x, "pgd1": attacked(clf, x, y, 1 / 255)}
    for key, xs in sets.items():
        right = {}
        for name in ("ttc", "scc"):
            defended = scc.defend(clf, name, seed=0)
            with torch.no_grad():
                right[name] = torch.cat([defended(xs[i: i + 250]).argmax(1) for i in range(0, len(y), 250)]) == y
        t, s = right["ttc"], right["scc"]
        print(f"{data.name} {len(y)} images, {key}: ttc {100 * t.float().mean():.2f}%  scc {100 * s.float().mean():.2f}%  "
              f"right only under ttc {(t & ~s).sum().item()}, only under scc {(s & ~t).sum().item()}")


def cmd_rtpt(clf, data, args):
    x, y = data.images, data.targets
    print(f"{data.name} {len(y)} images, clean; undefended {100 * accuracy(scc.defend(clf, 'none'), x, y):.1f}%")
    for overrides in ({}, {"steps": 0}, {"flip": False}, {"augmix": False}, {"crop_scale": (0.5, 1.0)},
                      {"crop_scale": (0.5, 1.0), "augmix": False}, {"crop_scale": (0.9, 1.0), "augmix": False}):
        print(f"rtpt {overrides or 'official'}: {100 * accuracy(scc.defend(clf, 'rtpt', seed=0, **overrides), x, y):.1f}%",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tau", "views", "pair", "rtpt"])
    ap.add_argument("--split", default="fashion-val", help="fashion-val (choices) | fashion (report only)")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--model", default="scc-tiny-fashion")
    ap.add_argument("--rtpt", action="store_true", help="also R-TPT with and without flips (slow)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clf = scc.load(args.model)
    data = load_dataset(args.split, clf.preprocess, args.images)
    {"tau": cmd_tau, "views": cmd_views, "pair": cmd_pair, "rtpt": cmd_rtpt}[args.what](clf, data, args)


if __name__ == "__main__":
    main()

"""Why bf16 TTC changes answers on a random-weight ViT-B-32 and not on a trained model: per-step gradient-sign
agreement, tau, the reference's top-1 margin, and top-1 agreement of three precision schemes with eager fp32.

    .venv/bin/python benchmarks/cpu_ttc_precision.py --models ViT-B-32,scc-tiny-digits,\\
        scc-tiny-fashion --images 64 --threads 2 --json benchmarks/results/cpu-ttc-precision.json

For each model, on the same images and TTC draws (scc.defenses.ttc.counterattack, eager):
  fp32          the reference: counterattack and final forward in fp32;
  fresh seed    fp32 with another seed of TTC's own draws (the yardstick: how many answers the defense's own
                randomness changes);
  bf16          counterattack and final forward with the image tower in bf16 (what `--dtype bf16` runs);
  bf16 + fp32   counterattack in bf16, final forward in fp32 (would the answer survive if only the prediction
                pass kept fp32?).
Reported per model: top-1 agreement of each scheme with the reference, the bf16 counterattack's gradient-sign
agreement per step and its tau-gate agreement, the reference's tau range and its median top-1 logit margin.
ViT-B-32 uses random weights on uniform-random pixels with DTD's 47 labels (no weights can be downloaded here);
the bundled models are trained and run on their held-out images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import scc
from scc.bench.latency import prepare
from scc.defenses.ttc import counterattack
from scc.metrics import top1_agreement
from scc.precision import engine_classifier
from scc.provenance import hardware, versions


def schemes(defended, x: torch.Tensor, start: torch.Tensor, fresh_start: torch.Tensor) -> dict:
    """Logits of each scheme, the reference's and bf16's tau, and bf16's per-step sign agreement, for one batch."""
    cfg = defended.config
    c32 = engine_classifier(defended.classifier, torch.float32)
    c16 = engine_classifier(defended.classifier, torch.bfloat16)
    signs32, signs16 = [], []
    d32, tau32 = counterattack(c32, x, cfg, start, signs32)
    d16, tau16 = counterattack(c16, x, cfg, start, signs16)
    fresh, _ = counterattack(c32, x, cfg, fresh_start)
    logits = lambda clf, d: clf.logits_from_embedding(clf.embed(x + d))  # noqa: E731
    return {"fp32": logits(c32, d32), "fresh seed": logits(c32, fresh), "bf16": logits(c16, d16),
            "bf16 + fp32": logits(c32, d16), "tau32": tau32, "tau16": tau16,
            "sign": torch.stack([(a == b).float().mean((1, 2, 3)) for a, b in zip(signs32, signs16)], 1)}


def measure(model: str, n_images: int, batch: int) -> dict:
    clf, x, _, pixels = prepare(model, None, n_images)
    defended, fresh = scc.defend(clf, "ttc", seed=0), scc.defend(clf, "ttc", seed=1)
    starts, fresh_starts = defended.draws(x)["start"], fresh.draws(x)["start"]
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            parts.append(schemes(defended, x[i:i + batch], starts[i:i + batch], fresh_starts[i:i + batch]))
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ref = out["fp32"]
    top2 = ref.topk(2, dim=1).values
    thres = defended.config.tau_thres
    return {"model": model, "pixels": pixels, "images": len(x), "classes": ref.shape[1],
            "top1_agreement": {k: top1_agreement(out[k], ref) for k in ("fresh seed", "bf16", "bf16 + fp32")},
            "reference": "fp32, same draws (the fresh seed: other draws)",
            "sign_agreement_per_step": out["sign"].mean(0).tolist(),
            "tau_gate_agreement": ((out["tau32"] < thres) == (out["tau16"] < thres)).float().mean().item(),
            "tau_min_median_max": [out["tau32"].min().item(), out["tau32"].median().item(), out["tau32"].max().item()],
            "counterattacked_fraction": (out["tau32"] < thres).float().mean().item(),
            "median_top1_margin_logits": (top2[:, 0] - top2[:, 1]).median().item(),
            "logit_scale": float(clf.logit_scale)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B-32,scc-tiny-digits,scc-tiny-fashion")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.json and not Path(args.json).parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist; create it or pick another path")
    torch.set_num_threads(args.threads)
    report = {"command": " ".join(sys.argv), "load_average_at_start": os.getloadavg()[0], "rows": []}
    for model in args.models.split(","):
        row = measure(model, args.images, args.batch_size)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    report.update(load_average_at_end=os.getloadavg()[0], hardware=hardware("cpu"), versions=versions())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

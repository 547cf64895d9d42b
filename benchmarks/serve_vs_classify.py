"""The bundled Fashion-MNIST test images saved as PNG files, through every entry point: accuracy and agreement.

    python benchmarks/serve_vs_classify.py --images 1000 --json benchmarks/results/serve-vs-classify-fashion.json

Each defense (none, and scc under the same seed) answers the same PNG files through
  - `scc classify` (the command, in this process),
  - a real `scc serve` (Ray Serve on 127.0.0.1, eager, 1 replica, --replay-draws so the service is given the
    classify run's seed and keys) over HTTP and over gRPC,
  - `scc eval`'s dataset tensors (`load_dataset("fashion", ...)`, keys = dataset index, as eval runs them),
  - and, for comparison, the centre-crop rule the service applied before every entry point shared the model's
    preprocessing (`Preprocess(32)`: short side to 37, centre 32), in this process.
Reported per path: accuracy, label agreement with classify, largest top-1 score difference to classify.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import scc
from scc.cli import main as scc_main
from scc.data import fashion_subset, load_dataset
from scc.images import Preprocess
from scc.models import FASHION_NAME
from scc.provenance import hardware, versions
from scc.serve.client import Client, GrpcClient, multipart
from scc.serve.process import ServerProcess, free_port

SEED = 2024
CHUNK = 16  # images per request (the service's default --max-images is 64)


def classify_cli(paths: list[Path], defense: str) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="scc-classify-")) / "out.json"
    code = scc_main(["classify", *map(str, paths), "--model", FASHION_NAME, "--defense", defense,
                     "--seed", str(SEED), "--json", str(out), "--quiet", "--batch-size", "64"])
    assert code == 0, code
    return [{"label": r["label"], "score": r["score"]} for r in json.loads(out.read_text())["results"]]


def serve_paths(paths: list[Path], defense: str, log: Path) -> dict[str, list[dict]]:
    grpc_port = free_port()
    answers: dict[str, list[dict]] = {"http": [], "grpc": []}
    with ServerProcess(["--model", FASHION_NAME, "--defense", defense, "--backend", "eager", "--replicas", "1",
                        "--replay-draws", "--max-batch", "16", "--grpc-port", str(grpc_port)], log) as server:
        client, grpc = Client(server.url, timeout=120), GrpcClient(f"127.0.0.1:{grpc_port}", timeout=120)
        try:
            for lo in range(0, len(paths), CHUNK):
                chunk = paths[lo: lo + CHUNK]
                keys = ",".join(str(lo + i) for i in range(len(chunk)))
                ctype, body = multipart([("image", p.name, p.read_bytes()) for p in chunk])
                status, raw = client.request("POST", f"/v1/classify?seed={SEED}&key={keys}", body,
                                             {"Content-Type": ctype})
                assert status == 200, raw[:300]
                answers["http"] += [{"label": r["label"], "score": max(r["scores"].values())}
                                    for r in json.loads(raw)["results"]]
                code, answer, _ = grpc.classify([(p.name, p.read_bytes(), str(lo + i)) for i, p in enumerate(chunk)],
                                                seed=str(SEED))
                assert code == "OK", answer
                answers["grpc"] += [{"label": r["label"], "score": max(r["scores"].values())}
                                    for r in answer["results"]]
        finally:
            client.close()
            grpc.close()
    return answers


def in_process(x: torch.Tensor, defense: str) -> list[dict]:
    clf = scc.load(FASHION_NAME)
    defended = scc.defend(clf, defense, seed=SEED)
    rows = []
    with torch.no_grad():
        for lo in range(0, len(x), 64):
            p = defended(x[lo: lo + 64], keys=list(range(lo, min(lo + 64, len(x))))).softmax(-1)
            rows += [{"label": clf.labels[int(i)], "score": round(float(v), 4)} for v, i in zip(*p.max(-1))]
    return rows


def summary(rows: list[dict], reference: list[dict], labels: list[str]) -> dict:
    return {"accuracy": round(float(np.mean([r["label"] == t for r, t in zip(rows, labels)])), 4),
            "agreement_with_classify": round(float(np.mean([r["label"] == c["label"]
                                                            for r, c in zip(rows, reference)])), 4),
            "max_top1_score_difference": round(max(abs(r["score"] - c["score"]) for r, c in zip(rows, reference)), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="how many of the 1000 bundled test images")
    p.add_argument("--defenses", default="none,scc")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True, help="where to write the result")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    folder = Path(tempfile.mkdtemp(prefix="scc-fashion-png-"))
    images, targets, index = fashion_subset()
    from PIL import Image

    paths = []
    for i in range(a.images):
        paths.append(folder / f"{i:04d}-test{index[i]}.png")
        Image.fromarray(images[i]).save(paths[-1])  # 28x28 grayscale, as Fashion-MNIST ships
    truth = [scc.data.FASHION_CLASSES[int(t)] for t in targets[: a.images]]
    dataset = load_dataset("fashion", scc.load(FASHION_NAME).preprocess, a.images).images
    old_rule = torch.stack([Preprocess(32).file(p) for p in paths])
    report = {"command": " ".join(["python", *sys.argv]), "model": FASHION_NAME, "images": a.images, "seed": SEED,
              "files": "28x28 grayscale PNG, one per bundled Fashion-MNIST test image", "hardware": hardware(),
              "versions": versions(["ray"]), "defenses": {}}
    for defense in a.defenses.split(","):
        t0 = time.perf_counter()
        reference = classify_cli(paths, defense)
        paths_rows = {"classify": reference, **serve_paths(paths, defense, folder / f"serve-{defense}.log"),
                      "eval_dataset": in_process(dataset, defense),
                      "centre_crop_rule_before": in_process(old_rule, defense)}
        report["defenses"][defense] = {name: summary(rows, reference, truth) for name, rows in paths_rows.items()}
        report["defenses"][defense]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(defense, json.dumps(report["defenses"][defense]), flush=True)
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

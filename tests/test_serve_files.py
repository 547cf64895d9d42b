"""Real image files through a real `scc serve` (Ray Serve on 127.0.0.1) over HTTP and gRPC answer as `scc classify`
answers for the same files: the bundled Fashion-MNIST model here (its 2-pixel frame is what a centre crop used to
lose); the digits model is checked the same way in test_serve_e2e.py. Under --replay-draws the service is given the
classify run's seed and keys (classify numbers its files 0, 1, ...), so the defended scores must agree, not only the
labels."""
from __future__ import annotations

import json

import pytest

from scc.cli import main
from scc.models import FASHION_NAME
from scc.serve.client import Client, GrpcClient, multipart
from scc.serve.process import ServerProcess, free_port

from test_images import sample_files

pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[serve]')")
pytest.importorskip("grpc", reason="grpcio (a Ray Serve dependency) is not installed")

pytestmark = pytest.mark.serve

SEED = 1234


def classify_json(capsys, paths, model: str, defense: str, seed: int) -> list[dict]:
    code = main(["classify", *map(str, paths), "--model", model, "--defense", defense, "--seed", str(seed),
                 "--json", "-", "--quiet"])
    assert code == 0
    return json.loads(capsys.readouterr().out)["results"]


def served(url: str, grpc_target: str, paths, seed: int, token: str | None = None,
           cafile: str | None = None, grpc_cafile: str | None = None) -> dict[str, list[dict]]:
    """The same files, keys 0..n-1 under `seed`, as one multipart HTTP request and one gRPC call (TLS with
    `grpc_cafile`)."""
    keys = ",".join(str(i) for i in range(len(paths)))
    ctype, body = multipart([("image", p.name, p.read_bytes()) for p in paths])
    c = Client(url, timeout=60, cafile=cafile, token=token)
    try:
        status, raw = c.request("POST", f"/v1/classify?seed={seed}&key={keys}&top_k=3", body,
                                {"Content-Type": ctype})
    finally:
        c.close()
    assert status == 200, raw
    g = GrpcClient(grpc_target, token=token, timeout=60, cafile=grpc_cafile)
    try:
        code, answer, _ = g.classify([(p.name, p.read_bytes(), str(i)) for i, p in enumerate(paths)], top_k=3,
                                     seed=str(seed))
    finally:
        g.close()
    assert code == "OK", answer
    return {"http": json.loads(raw)["results"], "grpc": answer["results"]}


def assert_same_answers(want: list[dict], got: dict[str, list[dict]]) -> None:
    """Labels equal; top-3 scores equal to classify's 4 printed decimals."""
    for protocol, rows in got.items():
        assert len(rows) == len(want), (protocol, rows)
        for w, g in zip(want, rows):
            assert g["label"] == w["label"], (protocol, w["path"], g, w)
            for label, score in w["top"]:
                assert abs(g["scores"][label] - score) <= 1.5e-4, (protocol, w["path"], label, g["scores"], w["top"])


@pytest.fixture(scope="module")
def fashion_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-fashion")
    grpc_port = free_port()
    proc = ServerProcess(["--model", FASHION_NAME, "--defense", "scc", "--backend", "eager", "--replicas", "1",
                          "--replay-draws", "--max-batch", "8", "--grpc-port", str(grpc_port), "--threads", "1"],
                         folder / "serve.log")
    proc.start()
    yield proc, f"127.0.0.1:{grpc_port}", folder
    proc.stop()
    assert not proc.left_running, proc.left_running


def test_fashion_files_answer_as_classify_over_http_and_grpc(fashion_server, capsys):
    proc, grpc_target, folder = fashion_server
    (folder / "files").mkdir()
    paths = sample_files(folder / "files", seed=3)
    want = classify_json(capsys, paths, FASHION_NAME, "scc", SEED)
    assert_same_answers(want, served(proc.url, grpc_target, paths, SEED))

"""scc serve: request parsing and the batch handler as plain functions (no Ray), and one end-to-end test of the
real Ray Serve application on loopback."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import scc
from scc.errors import SccError
from scc.serve.app import serve_config_yaml
from scc.serve.requests import Item, RequestError, decode_image, parse_request
from scc.serve.service import Service, service_config

SIZE, MAX_PIXELS, MAX_BODY = 32, 1_000_000, 1_000_000


def png_bytes(x: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (10^10): a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def multipart(parts: list[tuple[str, str, bytes]], boundary: str = "scc-test-boundary") -> tuple[str, bytes]:
    body = b""
    for name, filename, data in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def parse(ctype, body, query=None):
    return parse_request(ctype, body, query or {}, SIZE, MAX_PIXELS, MAX_BODY)


@pytest.fixture(scope="module")
def images(digits):
    return digits[0][:12]


# ----------------------------------------------------------------------------------------------------------
# Request parsing
# ----------------------------------------------------------------------------------------------------------
def test_single_image(images):
    items = parse("image/png", png_bytes(images[0]), {"seed": ["3"], "key": ["17"], "top_k": ["2"]})
    assert len(items) == 1 and items[0].error is None
    assert items[0].x.shape == (3, SIZE, SIZE) and 0 <= items[0].x.min() and items[0].x.max() <= 1
    assert (items[0].seed, items[0].key, items[0].top_k) == (3, 17, 2)  # decimal keys are ints, as dataset indices
    assert torch.allclose(items[0].x, images[0], atol=1 / 255)  # lossless PNG round trip, 8-bit quantised


def test_multipart_with_a_corrupt_part(images):
    ctype, body = multipart([("image", "a.png", png_bytes(images[0])), ("image", "bad.png", b"\x89PNG garbage"),
                             ("other", "x.txt", b"ignored"), ("image", "c.png", png_bytes(images[2]))])
    items = parse(ctype, body, {"key": ["k1,k2", "9"]})
    assert [it.name for it in items] == ["a.png", "bad.png", "c.png"]
    assert [it.key for it in items] == ["k1", "k2", 9]
    assert items[0].error is None and items[2].error is None
    assert "bad.png" in items[1].error and "not a readable image" in items[1].error
    assert torch.allclose(items[2].x, images[2], atol=1 / 255)  # binary payloads survive the MIME parser


@pytest.mark.parametrize("ctype, body, query, status, words", [
    ("image/png", b"", None, 400, "empty body"),
    ("image/png", b"not an image at all", None, 400, "not a readable image"),
    ("text/plain", b"hello", None, 415, "unsupported Content-Type"),
    ("image/png", b"x" * (MAX_BODY + 1), None, 413, "exceeds the limit"),
    ("image/png", bomb_png(), None, 413, "exceeds the limit"),
    ("image/png", b"\x89PNG", {"seed": ["abc"]}, 400, "seed must be an integer"),
    ("image/png", b"\x89PNG", {"key": ["1,2"]}, 400, "one per image"),
    ("image/png", b"\x89PNG", {"top_k": ["0"]}, 400, "top_k"),
])
def test_refused_requests(ctype, body, query, status, words):
    start = time.perf_counter()
    with pytest.raises(RequestError) as err:
        parse(ctype, body, query)
    assert err.value.status == status and words in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 1.0  # the bomb is refused from its header, never decoded


def test_client_seeds_are_refused_unless_allowed(images):
    body = png_bytes(images[0])
    with pytest.raises(RequestError, match="refuses client-chosen seeds.*--client-seeds") as err:
        parse_request("image/png", body, {"seed": ["3"]}, SIZE, 10**6, MAX_BODY, client_seeds=False)
    assert err.value.status == 403
    items = parse_request("image/png", body, {"key": ["4"]}, SIZE, 10**6, MAX_BODY, client_seeds=False)
    assert (items[0].seed, items[0].key) == (None, 4)  # keys stay: their draws come from the secret seed
    assert service_config()["client_seeds"] is False
    assert service_config(client_seeds="true")["client_seeds"] is True
    with pytest.raises(SccError, match="client_seeds must be true or false"):
        service_config(client_seeds="maybe")


def test_multipart_refusals():
    ctype, body = multipart([("image", "a.png", b"junk"), ("image", "b.png", bomb_png())])
    with pytest.raises(RequestError, match="no readable image: a.png.*b.png") as err:
        parse(ctype, body)
    assert err.value.status == 400
    ctype, body = multipart([("file", "a.png", b"junk")])
    with pytest.raises(RequestError, match="no 'image' part"):
        parse(ctype, body)


# ----------------------------------------------------------------------------------------------------------
# The batch handler
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service():
    torch.set_num_threads(1)
    return Service(service_config(defense="scc", backend="eager", max_batch=4, seed=None))


def eager_probs(seed: int, key, x: torch.Tensor) -> torch.Tensor:
    """The reference: the eager defended module with this seed, this key, alone."""
    defended = scc.defend(scc.load("scc-tiny-digits"), "scc", seed=seed)
    with torch.no_grad():
        return defended(x[None], keys=[key]).softmax(-1)[0]


def test_handler_matches_eager_alone_and_in_a_batch(service, images):
    calls = []
    runner = service.runner

    def spy(x, draws=None):
        calls.append(x.shape[0])
        return runner(x, draws)

    service.runner, service.pad = spy, True  # the compiled/onnx path: pad to a bucket, slice the padding off
    try:
        keys = [5, "req-a", 7, 123456789, "b"]
        items = [Item(name=f"i{j}", x=images[j], seed=11, key=k, top_k=10) for j, k in enumerate(keys)]
        items.insert(2, Item(name="broken", error="broken: not a readable image", error_kind="decode"))
        batch = service.handle_batch(items)
        alone = service.handle_batch([Item(name="solo", x=images[1], seed=11, key="req-a", top_k=10)])
    finally:
        service.runner, service.pad = runner, False
    assert calls == [4, 1, 1]  # 5 good items with max_batch 4: a chunk of 4, then 1 (bucket 1); then the solo call
    assert batch[2] == {"name": "broken", "error": "broken: not a readable image", "error_kind": "decode"}
    good = [r for r in batch if "error" not in r]
    assert [r["name"] for r in good] == ["i0", "i1", "i2", "i3", "i4"] and [r["key"] for r in good] == keys
    labels = service.classifier.labels
    for j, (r, k) in enumerate(zip(good, keys)):
        ref = eager_probs(11, k, images[j])
        got = torch.tensor([r["scores"][lab] for lab in labels])
        assert r["index"] == int(ref.argmax()) and r["label"] == labels[r["index"]]
        assert torch.allclose(got, ref, atol=1e-5), (k, got, ref)
    assert alone[0]["scores"] == pytest.approx(good[1]["scores"], abs=1e-5)  # same seed and key, other batch


def test_handler_fresh_keys_and_engine_errors(service, images):
    res = service.handle_batch([Item(name="a", x=images[0]), Item(name="b", x=images[0])])
    assert len({r["key"] for r in res}) == 2 and "seed" not in res[0]  # fresh uuid keys under the secret seed
    assert len(res[0]["scores"]) == 5  # default top_k
    runner = service.runner

    def broken(x, draws=None):
        raise RuntimeError("boom")

    service.runner = broken
    try:
        res = service.handle_batch([Item(name="a", x=images[0]), Item(name="b", error="b: bad", error_kind="decode")])
    finally:
        service.runner = runner
    assert res[0]["error_kind"] == "internal" and "boom" in res[0]["error"] and res[1]["error"] == "b: bad"
    assert service.ready and set(service.bucket_seconds) == {1, 2, 4}


def test_print_config_is_a_serve_config():
    yaml = pytest.importorskip("yaml")
    cfg = service_config(defense="scc-latency", backend="compiled", replicas=2, seed=3)
    doc = yaml.safe_load(serve_config_yaml(cfg, "127.0.0.1", 8000, 30))
    app = doc["applications"][0]
    assert app["import_path"] == "scc.serve.app:build_app" and doc["http_options"]["port"] == 8000
    assert app["args"] == {"defense": "scc-latency", "backend": "compiled", "replicas": 2, "seed": 3}
    assert service_config(app["args"])["replicas"] == 2


# ----------------------------------------------------------------------------------------------------------
# End to end: the real Ray Serve application on 127.0.0.1
# ----------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc), so the test can check Ray left none of them."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def post(url: str, body: bytes, ctype: str = "image/png", timeout: float = 60):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow  # 63 s alone, 113 s beside another job on this 2-core machine (Ray start ~12 s, shutdown ~5 s)
def test_end_to_end_on_loopback(images, tmp_path):
    pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[serve]')")
    pytest.importorskip("fastapi", reason="Ray Serve's FastAPI ingress is not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "scc.cli", "serve", "--port", str(port), "--host", "127.0.0.1",
                             "--defense", "scc", "--backend", "eager", "--max-batch", "8", "--batch-wait-ms", "20",
                             "--client-seeds"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    seen: set[int] = set()
    try:
        deadline = time.time() + 150
        while True:
            seen |= descendants(proc.pid)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.time() < deadline, "not ready in 150 s: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        seen |= descendants(proc.pid)
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(url + "/v1/info", timeout=10) as r:
            info = json.loads(r.read())
        assert info["ready"] and info["buckets"] == [1, 2, 4, 8] and info["seed"] == "secret"

        n = 32
        jobs = [(i, png_bytes(images[i % len(images)])) for i in range(n)]
        with ThreadPoolExecutor(n + 1) as pool:
            futures = [pool.submit(post, f"{url}/v1/classify?seed=42&key={i}&top_k=10", b) for i, b in jobs]
            corrupt = pool.submit(post, f"{url}/v1/classify", b"\x89PNG\r\n\x1a\n truncated", "image/png")
            ctype, body = multipart([("image", "a.png", jobs[0][1]), ("image", "bad.png", b"junk"),
                                     ("image", "c.png", jobs[1][1])])
            mixed = pool.submit(post, f"{url}/v1/classify?seed=42&key=0,x,1&top_k=10", body, ctype)
            answers = [f.result() for f in futures]
            bad_status, bad_body = corrupt.result()
            mixed_status, mixed_body = mixed.result()
        assert bad_status == 400 and "not a readable image" in bad_body["error"]
        assert mixed_status == 200 and "bad.png" in mixed_body["results"][1]["error"]
        for r, (status, body) in zip([mixed_body["results"][0], mixed_body["results"][2]], answers[:2]):
            assert r["key"] == body["results"][0]["key"] and r["scores"] == pytest.approx(body["results"][0]["scores"],
                                                                                       abs=1e-5)
        defended = scc.defend(scc.load("scc-tiny-digits"), "scc", seed=42)
        labels = defended.classifier.labels
        batch_sizes = []
        for (i, _), (status, body) in zip(jobs, answers):
            assert status == 200, body
            r = body["results"][0]
            assert r["key"] == i and r["seed"] == 42 and body["backend"] == "eager" and body["defense"] == "scc"
            with torch.no_grad():
                x = decode_image(jobs[i][1], SIZE, MAX_PIXELS)  # the 8-bit pixels the server saw
                ref = defended(x[None], keys=[i]).softmax(-1)[0]
            got = torch.tensor([r["scores"][lab] for lab in labels])
            assert r["index"] == int(ref.argmax()) and torch.allclose(got, ref, atol=1e-4), (i, got, ref)
            batch_sizes.append(r["batch_size"])
        assert max(batch_sizes) > 1  # concurrent requests were batched
    finally:
        seen |= descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(p) for p in seen):
        time.sleep(0.5)
    left = [p for p in seen if alive(p)]
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not left, f"processes left running after shutdown: {left}"


def test_engine_queue_coalesces_and_answers_everyone():
    """Continuous batching without Ray: submits that arrive while the engine runs share its next call."""
    import asyncio
    import threading

    from scc.serve.service import EngineQueue

    calls, gate = [], threading.Event()

    def handle(items):
        calls.append([it.name for it in items])
        gate.wait(5) if len(calls) == 1 else None  # the first call blocks until everyone has submitted
        return [{"name": it.name, "batch_size": len(items)} for it in items]

    async def main():
        q = EngineQueue(handle, max_batch=4)
        first = asyncio.ensure_future(q.submit([Item(name="a0")]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(q.submit([Item(name=f"b{i}"), Item(name=f"c{i}")])) for i in range(4)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == [{"name": "a0", "batch_size": 1}]
    assert [[r["name"] for r in res] for res in rest] == [[f"b{i}", f"c{i}"] for i in range(4)]
    assert calls == [["a0"], ["b0", "c0", "b1", "c1"], ["b2", "c2", "b3", "c3"]]  # full batches, FIFO


def test_compile_artifacts_are_written_once_and_keyed(tmp_path, capsys):
    """A compiled replica with --compile-cache leaves one torch.compiler artifact file, with its key beside it; a
    second replica with the same configuration loads that file (and answers the same), a replica that differs in
    anything its graphs depend on names another file, and a corrupt file is ignored."""
    from scc.backends.artifacts import artifact_path, load_compile_artifacts

    cfg = service_config(defense="none", backend="compiled", max_batch=1, compile_cache=str(tmp_path), seed=0)
    first = Service(cfg)
    assert first.artifacts and not first.artifacts_loaded
    assert Path(first.artifacts).stat().st_size > 0
    artifacts = lambda: sorted(p.name for p in tmp_path.glob("scc-*"))  # beside Inductor's own cache folders
    assert artifacts() == [Path(first.artifacts).name, Path(first.artifacts).name + ".json"]
    key = json.loads(Path(first.artifacts + ".json").read_text())
    assert key["defense"] == "none" and key["buckets"] == [1] and key["dtype"] == "fp32" and "torch" in key["versions"]
    second = Service(cfg)  # a new replica, same configuration: loads the first one's file instead of writing one
    assert second.artifacts == first.artifacts and second.artifacts_loaded
    assert artifacts() == [Path(first.artifacts).name, Path(first.artifacts).name + ".json"]
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = (s.handle_batch([Item(name="x", x=x, key=1)])[0]["scores"] for s in (first, second))
    assert a == b
    for field, other in (("defense", "ttc"), ("config", {"steps": 1}), ("dtype", "bf16"), ("buckets", [1, 2]),
                         ("labels", ["a", "b"]), ("model", "scc-tiny-fashion"), ("backend", "triton")):
        assert artifact_path(str(tmp_path), {**key, field: other}) != first.artifacts, field
    bad = tmp_path / "scc-bad.bin"
    bad.write_bytes(b"not an artifact")
    assert not load_compile_artifacts(str(bad)) and "ignoring the compile-cache artifact" in capsys.readouterr().err
    assert not load_compile_artifacts(str(tmp_path / "missing.bin"))
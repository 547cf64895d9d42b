"""scc serve without Ray: request parsing and its budgets, the batch handler and its draws, the bounded queue, the
front door (token, admission, body, deadlines, dead replicas), the compile cache's checks, the CLI's refusals.
The real Ray Serve service is tests/test_serve_e2e.py."""
from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import scc
from scc.errors import SccError
from scc.models import preprocessing_of
from scc.serve.app import serve_config_yaml
from scc.serve.client import multipart
from scc.serve.front import Front, read_body, token_digest
from scc.serve.requests import Item, Limits, RequestError, decode_image, parse_request
from scc.serve.service import EngineQueue, Service, service_config

SIZE = 32
PRE = preprocessing_of("scc-tiny-digits")  # the bundled model these tests send digits to (size 32)
LIMITS = Limits.for_model(SIZE, max_body_bytes=1_000_000)  # (16*32)^2 = 262144 pixels per image, 4x per request


def png_bytes(x: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data: a decompression bomb's start."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def parse(ctype, body, query=None, limits=LIMITS, replay=True):
    return parse_request(ctype, body, query or {}, PRE, limits, replay)


@pytest.fixture(scope="module")
def images(digits):
    return digits[0][:12]


# ----------------------------------------------------------------------------------------------------------
# Request parsing and its budgets
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
    assert torch.allclose(items[2].x, images[2], atol=1 / 255)  # binary payloads survive the multipart split


def animated_gif(frames: list[torch.Tensor]) -> bytes:
    from PIL import Image

    pics = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for f in frames]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=50, loop=0)
    return buf.getvalue()


def test_animated_image_uses_its_first_frame(images):
    gif = Limits.for_model(SIZE, max_body_bytes=1_000_000, formats="png,jpeg,webp,gif")  # GIF: behind a flag
    one = parse("image/gif", animated_gif([images[0]]), limits=gif)[0].x
    many = parse("image/gif", animated_gif([images[0], images[1], images[2]]), limits=gif)[0].x
    assert torch.equal(one, many)


def eps_bytes() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.mark.parametrize("ctype, body, query, status, words", [
    ("image/png", b"", None, 400, "empty body"),
    ("image/png", b"not an image at all", None, 400, "not a readable image"),
    ("image/png", eps_bytes(), None, 400, "not a readable image"),  # PostScript would reach Ghostscript: off-list
    ("text/plain", b"hello", None, 415, "unsupported Content-Type"),
    ("image/png", b"x" * (LIMITS.max_body_bytes + 1), None, 413, "exceeds the limit"),
    ("image/png", png_header(100_000, 100_000), None, 413, "per-image limit"),
    ("image/png", png_header(513, 512), None, 413, "per-image limit"),  # (16 * 32)^2 sized to the model
    ("image/png", b"\x89PNG", {"seed": ["abc"]}, 400, "seed must be an integer"),
    ("image/png", b"\x89PNG", {"seed": ["9" * 400]}, 400, "seed must be an integer"),
    ("image/png", b"\x89PNG", {"key": ["1,2"]}, 400, "one per image"),
    ("image/png", b"\x89PNG", {"key": ["k" * 201]}, 400, "key must be 1-200 characters"),
    ("image/png", b"\x89PNG", {"key": [",".join("k" * 65)]}, 400, "keys exceed the limit"),
    ("image/png", b"\x89PNG", {"top_k": ["0"]}, 400, "top_k"),
    ("image/png", b"\x89PNG", {"top_k": ["10" * 30]}, 400, "top_k"),
    ("image/png", b"\x89PNG", {"top_k": ["1e9"]}, 400, "top_k must be an integer"),
    ("image/png", b"\x89PNG", {"topk": ["3"]}, 400, "unknown query parameter"),
    ("multipart/form-data", b"--x\r\n", None, 400, "boundary"),
    ("multipart/form-data; boundary=x", b"no boundary here", None, 400, "no boundary line"),
    ("multipart/form-data; boundary=x", b"--x\r\n\r\nabc", None, 400, "no closing boundary"),
])
def test_refused_requests(ctype, body, query, status, words):
    start = time.perf_counter()
    with pytest.raises(RequestError) as err:
        parse(ctype, body, query)
    assert err.value.status == status and words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert time.perf_counter() - start < 1.0  # every refusal comes from headers and counts, never a decode


def test_pixel_budgets_refuse_before_decoding():
    """A 5.6 kB request of ten PNG headers claiming 6000x6000 pixels is refused before decoding. Here the
    per-image budget is sized to the model ((16 S)^2), and a request of images each within it, but together over
    the per-request budget, is refused from the headers too: nothing is decoded in either case."""
    ctype, body = multipart([("image", f"{i}.png", png_header(6000, 6000)) for i in range(10)])
    assert len(body) < 6000
    big = Limits.for_model(SIZE, max_pixels=40_000_000, max_request_pixels=100_000_000)
    start = time.perf_counter()
    with pytest.raises(RequestError, match="per-request limit of 100000000") as err:
        parse(ctype, body, limits=big)
    assert err.value.status == 413 and time.perf_counter() - start < 0.5
    with pytest.raises(RequestError, match="no readable image: 0.png: 6000x6000") as err:
        parse(ctype, body)  # the defaults for a 32-pixel model: each image is over the per-image budget
    assert err.value.status == 413 and time.perf_counter() - start < 1.0


def test_part_count_is_bounded_while_splitting():
    ctype, body = multipart([("image", f"{i}.png", b"") for i in range(200_000)])
    start = time.perf_counter()
    with pytest.raises(RequestError, match="more than 72 multipart parts") as err:
        parse(ctype, body, limits=Limits.for_model(SIZE, max_body_bytes=2 ** 26))
    assert err.value.status == 413 and time.perf_counter() - start < 0.5


def test_client_seeds_are_refused_unless_replay(images):
    body = png_bytes(images[0])
    with pytest.raises(RequestError, match="refuses client-chosen seeds.*--replay-draws") as err:
        parse("image/png", body, {"seed": ["3"]}, replay=False)
    assert err.value.status == 403
    items = parse("image/png", body, {"key": ["4"]}, replay=False)
    assert (items[0].seed, items[0].key) == (None, 4)  # keys stay: with fresh draws they only name the image
    assert service_config()["replay_draws"] is False
    assert service_config(client_seeds="true")["replay_draws"] is True  # the old name of the flag
    with pytest.raises(SccError, match="replay_draws must be true or false"):
        service_config(replay_draws="maybe")
    with pytest.raises(SccError, match="max_queue .* at least max_batch"):
        service_config(max_batch=8, max_queue=4)


# ----------------------------------------------------------------------------------------------------------
# The batch handler and its draws
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service():
    torch.set_num_threads(1)
    return Service(service_config(defense="scc", backend="eager", max_batch=4, max_queue=16, max_images=16,
                                  seed=None))


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


def test_fresh_draws_mix_a_request_nonce_into_seed_and_key(service, images):
    """Default mode: the same image and key under two requests (two nonces) get independent draws; the same nonce
    gives the same draws (one request); replay (a client seed) gives the eager module's draws for (seed, key)."""
    x = images[0]
    item = lambda nonce=None, seed=None: Item(name="x", x=x, key=7, nonce=nonce, seed=seed)
    a, b, a2 = (service.draws_for([item(n)]) for n in ("n1", "n2", "n1"))
    assert set(a) == {"start", "noise"}
    assert not torch.equal(a["start"], b["start"]) and not torch.equal(a["noise"], b["noise"])
    assert torch.equal(a["start"], a2["start"]) and torch.equal(a["noise"], a2["noise"])
    replay = service.draws_for([item(seed=5)])
    reference = scc.defend(scc.load("scc-tiny-digits"), "scc", seed=5).draws(x[None], keys=[7])
    assert all(torch.equal(replay[k], reference[k]) for k in reference)


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
    assert res[0]["error_kind"] == "internal" and "boom" not in res[0]["error"] and res[1]["error"] == "b: bad"
    assert service.ready and set(service.bucket_seconds) == {1, 2, 4}


def test_print_config_is_a_serve_config():
    yaml = pytest.importorskip("yaml")
    cfg = service_config(defense="scc-latency", backend="compiled", replicas=2, seed=3, token_sha256="ab" * 32)
    doc = yaml.safe_load(serve_config_yaml(cfg, "127.0.0.1", 8000, 30, grpc_port=9000))
    app = doc["applications"][0]
    assert app["import_path"] == "scc.serve.app:build_app" and doc["http_options"]["port"] == 8000
    assert app["args"] == {"defense": "scc-latency", "backend": "compiled", "replicas": 2, "seed": 3}
    assert doc["grpc_options"]["grpc_servicer_functions"] == ["scc.serve.grpc_api.add_ClassifierServicer_to_server"]
    assert service_config(app["args"])["replicas"] == 2


# ----------------------------------------------------------------------------------------------------------
# The bounded queue
# ----------------------------------------------------------------------------------------------------------
def test_engine_queue_coalesces_and_answers_everyone():
    """Continuous batching without Ray: submits that arrive while the engine runs share its next call."""
    import threading

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


def test_engine_queue_bound_deadline_and_cancel():
    """A submit that would overflow the queue is answered at once; images whose deadline passed while queued are
    dropped before compute; a cancelled submit (client gone) takes its images out of the queue."""
    import threading

    computed, gate = [], threading.Event()

    def handle(items):
        computed.extend(it.name for it in items)
        gate.wait(5)
        return [{"name": it.name} for it in items]

    async def main():
        q = EngineQueue(handle, max_batch=2, max_queue=6)
        busy = asyncio.ensure_future(q.submit([Item(name="busy0"), Item(name="busy1")]))  # holds the engine
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(q.submit([Item(name="late", deadline=time.monotonic() + 0.01)]))
        gone = asyncio.ensure_future(q.submit([Item(name="gone0"), Item(name="gone1")]))
        kept = asyncio.ensure_future(q.submit([Item(name="kept")]))
        await asyncio.sleep(0.05)
        over = await q.submit([Item(name=f"over{i}") for i in range(3)])  # 4 queued + 3 > 6: refused at once
        gone.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        return q, over, await busy, await late, await kept

    q, over, busy, late, kept = asyncio.run(main())
    assert [r["error_kind"] for r in over] == ["overloaded"] * 3 and "Retry-After" in over[0]["error"]
    assert late[0]["error_kind"] == "deadline" and kept == [{"name": "kept"}] and len(busy) == 2
    assert computed == ["busy0", "busy1", "kept"]  # neither the late nor the cancelled images reached the engine
    assert q.counts == {"overloaded": 3, "deadline": 1, "cancelled": 2, "computed": 3}


# ----------------------------------------------------------------------------------------------------------
# The front door
# ----------------------------------------------------------------------------------------------------------
class Gone(Exception):
    """What a dead replica raises at the caller (Ray's RayActorError in the real ingress)."""


def make_front(service: Service | None, token: str | None = None, fail: list | None = None, **cfg):
    """A Front whose model is `service` behind an EngineQueue (or a stub), `fail` a list of exceptions raised by
    the first model calls."""
    cfg = service_config(**{"max_batch": 4, "max_queue": 16, "max_images": 16, "timeout_s": 5, "body_timeout_s": 0.5,
                            "token_sha256": token_digest(token) if token else None, **cfg})
    queue = EngineQueue(service.handle_batch, 4, 16) if service is not None else None
    fail = list(fail or [])

    async def call_model(items, budget):
        if fail:
            raise fail.pop(0)
        now = time.monotonic()
        for it in items:
            it.deadline = now + budget
        return await queue.submit(items)

    async def describe():
        return service.info() if service is not None else {"model": "m", "defense": "d", "backend": "b",
                                                           "image_size": SIZE, "labels": ["a", "b"],
                                                           "preprocess": PRE.to_dict()}

    return Front(cfg, call_model, describe, replica_gone=lambda err: isinstance(err, Gone))


async def chunks(*parts: bytes, pause: float = 0.0):
    for p in parts:
        if pause:
            await asyncio.sleep(pause)
        yield p


def post(front: Front, body: bytes, query=None, headers=None, pause: float = 0.0):
    headers = {"content-type": "image/png", **(headers or {})}
    return front.classify(headers, query or {}, chunks(body[: len(body) // 2], body[len(body) // 2:], pause=pause))


def test_front_fresh_draws_by_default_and_replay_on_request(service, images):
    """Two identical requests (same image, same key): different answers by default, identical in replay mode."""
    body = png_bytes(images[3])

    async def twice(front, query):
        return [await post(front, body, query) for _ in range(2)]

    fresh = asyncio.run(twice(make_front(service), {"key": ["7"], "top_k": ["10"]}))
    replay = asyncio.run(twice(make_front(service, replay_draws=True), {"key": ["7"], "seed": ["3"], "top_k": ["10"]}))
    assert [r.status for r in fresh + replay] == [200] * 4
    assert fresh[0].body["draws"] == "fresh" and replay[0].body["draws"] == "replay"
    f0, f1 = (r.body["results"][0]["scores"] for r in fresh)
    r0, r1 = (r.body["results"][0]["scores"] for r in replay)
    assert f0 != f1 and r0 == r1
    x = decode_image(body, PRE, LIMITS.max_pixels)
    ref = eager_probs(3, 7, x)
    labels = service.classifier.labels
    assert torch.allclose(torch.tensor([r0[lab] for lab in labels]), ref, atol=1e-5)
    refused = asyncio.run(post(make_front(service), body, {"seed": ["3"]}))
    assert refused.status == 403 and set(refused.body) == {"error", "code"} and refused.body["code"] == "forbidden"


def test_info_and_answers_name_the_defense_and_its_spec(images):
    """`defense` is the bare name, `spec` the full string the server was started with; times end in _s."""
    torch.set_num_threads(1)
    latency = Service(service_config(defense="scc-latency:steps=2", backend="eager", max_batch=1, seed=0))
    info = latency.info()
    assert (info["defense"], info["spec"]) == ("scc", "scc-latency:steps=2")
    assert {"load_s", "bucket_warm_s", "compile_s"} <= set(info) and not any("seconds" in k for k in info)
    answer = asyncio.run(post(make_front(latency), png_bytes(images[0])))
    assert answer.status == 200 and (answer.body["defense"], answer.body["spec"]) == ("scc", "scc-latency:steps=2")


def test_front_token(service, images):
    token = "s3cret-token-0123456789"
    front = make_front(service, token=token)
    body = png_bytes(images[0])
    assert token not in json.dumps(front.cfg) and front.cfg["token_sha256"] == token_digest(token)
    for auth in (None, "Bearer wrong-token-0123456789", f"Basic {token}", token, "Bearer"):
        reply = asyncio.run(post(front, body, headers={"authorization": auth} if auth else {}))
        assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer") and \
            set(reply.body) == {"error", "code"}, auth
    assert asyncio.run(post(front, body, headers={"authorization": f"Bearer {token}"})).status == 200
    assert front.counts["unauthorized"] == 5 and front.counts["ok"] == 1


def test_front_body_limits_and_slow_clients(images):
    front = make_front(None)
    body = png_bytes(images[0])
    start = time.perf_counter()
    slow = asyncio.run(post(front, body, pause=0.4))  # two halves 0.4 s apart: over the 0.5 s body timeout
    assert slow.status == 408 and "did not arrive within 0.5 s" in slow.body["error"]
    assert time.perf_counter() - start < 1.5
    big = asyncio.run(front.classify({"content-length": str(10 ** 9)}, {}, chunks(b"")))
    assert big.status == 413 and "exceeds the limit" in big.body["error"]  # from the header, nothing read
    with pytest.raises(RequestError, match="exceeds the limit of 4 bytes"):
        asyncio.run(read_body(chunks(b"abc", b"def"), 4, 1.0))
    short = asyncio.run(post(front, body, {"timeout_ms": ["999999"]}))
    assert short.status == 400 and "timeout_ms must lie in 1..5000" in short.body["error"]


def test_front_admission_dead_replicas_and_deadlines(service, images):
    body = png_bytes(images[0])
    front = make_front(service, fail=[Gone("replica died"), Gone("replica died")])
    ok = asyncio.run(post(front, body))  # two dead replicas, then a live one: answered within the deadline
    assert ok.status == 200 and front.counts["replica_retries"] == 2

    dead = make_front(service, fail=[Gone("replica died")] * 10_000, timeout_s=1.0)
    start = time.perf_counter()
    reply = asyncio.run(post(dead, body))  # no live replica before the deadline: a retryable 503, on time
    assert reply.status == 503 and reply.headers["Retry-After"] == "1" and "deadline" in reply.body["error"]
    assert time.perf_counter() - start < 2.0

    broken = make_front(service, fail=[ValueError("a bug")])
    reply = asyncio.run(post(broken, body))  # not a dead replica: a 500 with a request id, not the exception's text
    assert reply.status == 500 and reply.body["code"] == "internal" and "a bug" not in reply.body["error"]

    full = make_front(service)
    full.inflight = full.max_inflight
    reply = asyncio.run(post(full, body))
    assert reply.status == 503 and reply.headers["Retry-After"] == "1" and "requests in flight" in reply.body["error"]

    async def overloaded(items, budget):
        return [{"name": it.name, "error": "overloaded: ...", "error_kind": "overloaded"} for it in items]

    front = make_front(service)
    front.call_model = overloaded
    reply = asyncio.run(post(front, body))
    assert reply.status == 503 and reply.headers["Retry-After"] == "1" and front.counts["overloaded"] == 1


# ----------------------------------------------------------------------------------------------------------
# The compile cache
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.compile
def test_compile_artifacts_are_written_once_keyed_and_signed(tmp_path, monkeypatch):
    """A compiled replica with --compile-cache leaves one signed torch.compiler artifact file, with its key beside
    it; a second replica with the same configuration loads that file (and answers the same), a replica that
    differs in anything its graphs depend on names another file."""
    from scc.backends.artifacts import KEY_NAME, artifact_path

    cache = tmp_path / "cc"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))  # restored after
    cfg = service_config(defense="none", backend="compiled", max_batch=1, compile_cache=str(cache), seed=0)
    first = Service(cfg)
    assert first.artifacts and first.artifacts_status == "absent"
    name = Path(first.artifacts).name
    artifacts = lambda: sorted(p.name for p in cache.glob("scc-*"))  # beside Inductor's own cache folders
    assert artifacts() == sorted([KEY_NAME, name, name + ".json", name + ".sig"])
    assert oct(cache.stat().st_mode & 0o777) == "0o700" and oct((cache / KEY_NAME).stat().st_mode & 0o777) == "0o600"
    key = json.loads(Path(first.artifacts + ".json").read_text())
    assert key["spec"] == "none" and key["buckets"] == [1] and key["dtype"] == "fp32" and "torch" in key["versions"]
    second = Service(cfg)  # a new replica, same configuration: loads the first one's file instead of writing one
    assert second.artifacts == first.artifacts and second.artifacts_status == "loaded"
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = (s.handle_batch([Item(name="x", x=x, key=1)])[0]["scores"] for s in (first, second))
    assert a == b
    for field, other in (("spec", "ttc"), ("config", {"steps": 1}), ("dtype", "bf16"), ("buckets", [1, 2]),
                         ("labels", ["a", "b"]), ("model", "scc-tiny-fashion"), ("backend", "triton")):
        assert artifact_path(str(cache), {**key, field: other}) != first.artifacts, field


def fake_artifact(folder: Path, mac_key: bytes, blob: bytes = b"pickled code") -> str:
    from scc.backends.artifacts import artifact_mac

    path = str(folder / "scc-0123.bin")
    Path(path).write_bytes(blob)
    Path(path + ".sig").write_text(artifact_mac(blob, path, mac_key))
    os.chmod(path, 0o600)
    return path


def test_tampered_foreign_or_unsigned_artifacts_are_never_loaded(tmp_path, monkeypatch, capsys):
    from scc.backends import artifacts as art

    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: loaded.append(blob) or object())
    folder = tmp_path / "cc"
    art.check_cache_folder(str(folder))
    key = art.cache_mac_key(str(folder))
    path = fake_artifact(folder, key)
    assert art.load_compile_artifacts(path, key) == "loaded" and loaded == [b"pickled code"]
    cases = {
        "tampered": lambda: Path(path).write_bytes(b"pickled code, changed"),
        "foreign key": lambda: fake_artifact(folder, b"k" * 64),
        "unsigned": lambda: Path(path + ".sig").unlink(),
        "signed under another name": lambda: Path(path + ".sig").write_text(
            art.artifact_mac(b"pickled code", str(folder / "scc-other.bin"), key)),
        "group-writable": lambda: os.chmod(path, 0o620),
    }
    for case, spoil in cases.items():
        fake_artifact(folder, key)
        os.chmod(path, 0o600)
        spoil()
        loaded.clear()
        capsys.readouterr()
        status = art.load_compile_artifacts(path, key)
        err = capsys.readouterr().err
        assert status.startswith("refused") and not loaded, case
        assert err.count("\n") == 1 and "refusing the compile-cache artifact" in err, (case, err)


def test_cache_folders_others_could_write_are_refused(tmp_path):
    from scc.backends.artifacts import cache_mac_key, check_cache_folder

    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    for mode, words in ((0o770, "writable by its group"), (0o707, "writable by every user")):
        folder = base / f"m{mode:o}"
        folder.mkdir()
        os.chmod(folder, mode)
        with pytest.raises(SccError, match=words):
            check_cache_folder(str(folder))
    inside = base / "inside"
    inside.mkdir(mode=0o700)
    (inside / "entry").write_bytes(b"x")
    os.chmod(inside / "entry", 0o666)
    with pytest.raises(SccError, match="entry is writable by every user"):
        check_cache_folder(str(inside))
    os.chmod(inside / "entry", 0o644)
    check_cache_folder(str(inside))
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # a parent others can write (no sticky bit): they could swap the cache folder
    (shared / "cc").mkdir(mode=0o700)
    with pytest.raises(SccError, match="folder .*shared above it is writable by every user"):
        check_cache_folder(str(shared / "cc"))
    link = base / "link"
    link.symlink_to(inside)
    with pytest.raises(SccError, match="symbolic link"):
        check_cache_folder(str(link))
    key = base / "key"
    key.write_text("k" * 64)
    os.chmod(key, 0o644)
    with pytest.raises(SccError, match="readable by other users"):
        cache_mac_key(str(inside), str(key))
    with pytest.raises(SccError, match="no such file"):
        cache_mac_key(str(inside), str(base / "missing"))
    if os.getuid() == 0:  # only root can give a folder to another user
        other = base / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, 12345)
        with pytest.raises(SccError, match="owned by uid 12345"):
            check_cache_folder(str(other))


def test_a_refused_cache_folder_is_one_line_and_the_replica_compiles_without_it(tmp_path, capsys):
    from scc.cli import main

    folder = tmp_path / "cc"
    folder.mkdir()
    os.chmod(folder, 0o777)
    assert main(["serve", "--compile-cache", str(folder), "--backend", "compiled"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writable by every user" in err
    s = Service(service_config(defense="none", backend="eager", max_batch=1, compile_cache=str(folder)))
    assert s.artifacts_status.startswith("refused") and "writable by every user" in s.artifacts_status
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(folder)
    assert capsys.readouterr().err.count("not using the compile cache") == 1


def test_serve_cli_refuses_unsafe_secrets(tmp_path, capsys):
    from scc.cli import main

    token = tmp_path / "token"
    token.write_text("short\n")
    os.chmod(token, 0o600)
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    for argv, words in ((["--token-file", str(token)], "use at least 16"),
                        (["--token-file", str(tmp_path / "nope")], "no such file"),
                        (["--tls-cert", str(cert)], "--tls-cert and --tls-key go together"),
                        (["--tls-cert", str(cert), "--tls-key", str(tmp_path / "nope")], "--tls-key")):
        assert main(["serve", "--print-config", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
    token.write_text("a-long-enough-token-0123\n")
    os.chmod(token, 0o644)
    assert main(["serve", "--print-config", "--token-file", str(token)]) == 2
    assert "readable by other users" in capsys.readouterr().err
    os.chmod(token, 0o600)
    assert main(["serve", "--print-config", "--token-file", str(token), "--client-seeds"]) == 0
    out = capsys.readouterr().out
    assert token_digest("a-long-enough-token-0123") not in out and "a-long-enough-token" not in out
    assert "replay_draws: true" in out


# ----------------------------------------------------------------------------------------------------------
# The proxy's hardening fails closed (Ray and uvicorn imported, nothing started)
# ----------------------------------------------------------------------------------------------------------
BINDER_NAMES = ("add_grpc_address", "add_port_to_grpc_server")


@pytest.fixture
def worker(monkeypatch):
    """This process as a fresh worker of the service: the service's environment set, and every Ray and uvicorn
    attribute the setup hook patches restored afterwards."""
    import sys

    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[serve]')")
    uvicorn = pytest.importorskip("uvicorn")
    import ray.serve._private.default_impl  # noqa: F401 (the modules the hook patches or checks)
    import ray.serve._private.grpc_util  # noqa: F401
    import ray.serve._private.http_util  # noqa: F401
    import ray.serve._private.replica  # noqa: F401
    import uvicorn.config

    from scc.serve import proxy

    for k, v in proxy.proxy_env(2, 3, 1 << 20).items():
        monkeypatch.setenv(k, v)
    config = uvicorn.config.Config
    for attr in ("__init__", "load"):
        monkeypatch.setattr(config, attr, getattr(config, attr))
    monkeypatch.setattr(uvicorn, "Config", uvicorn.Config)
    for name, module in list(sys.modules.items()):
        if name.startswith("ray.serve") and module is not None:
            for attr in BINDER_NAMES:
                if attr in vars(module):
                    monkeypatch.setattr(module, attr, getattr(module, attr))
    return proxy


def _hardened(config_class) -> bool:
    """Whether a Config built by `config_class` the way Ray builds one carries the read deadlines and TLS suites."""
    from scc.serve.proxy import TLS_CIPHERS

    c = config_class(lambda: None, factory=True, lifespan="off", log_config=None, access_log=False)
    return callable(getattr(c.http, "_scc_expire", None)) and c.ssl_ciphers == TLS_CIPHERS  # ReadDeadlines


def test_the_hook_hardens_every_name_ray_builds_a_uvicorn_config_by(worker):
    """Ray 2.60 builds its HTTP server with `uvicorn.Config(...)` and its ASGI lifespan with a bare imported
    `Config`: after the hook, both (and uvicorn.config.Config) build hardened servers, every gRPC bind is replaced,
    and check_patched finds nothing missing; a second run changes nothing."""
    import uvicorn
    import uvicorn.config
    from ray.serve._private import default_impl, http_util, replica

    worker.setup_worker()
    for config_class in (uvicorn.Config, uvicorn.config.Config, http_util.uvicorn.Config, http_util.Config):
        assert _hardened(config_class), config_class
    assert default_impl.add_grpc_address._scc_loopback and replica.add_port_to_grpc_server._scc_loopback
    assert worker.check_targets() == [] and worker.check_patched() == []
    init = uvicorn.config.Config.__init__
    worker.setup_worker()
    assert uvicorn.config.Config.__init__ is init


def test_a_server_whose_protocol_lost_the_deadlines_is_refused_when_it_loads(worker):
    """An option that swaps the HTTP protocol after the Config was built (as http2= would): `load` refuses."""
    import uvicorn.config
    from uvicorn.protocols.http.h11_impl import H11Protocol

    worker.setup_worker()
    c = uvicorn.config.Config(lambda: None, factory=True, lifespan="off", log_config=None)
    c.http = H11Protocol
    with pytest.raises(SccError, match="read deadlines"):
        c.load()


def _mutations():
    """(what breaks, the phrase the refusal must name): each a Ray or uvicorn that changed under the patches."""
    import importlib
    import types

    def delete(module_name, attr):
        return lambda mp: mp.delattr(importlib.import_module(module_name), attr)

    def replace(module_name, attr, value):
        return lambda mp: mp.setattr(importlib.import_module(module_name), attr, value)

    other_uvicorn = types.ModuleType("uvicorn")
    other_uvicorn.Config = type("Config", (), {})

    async def binds_itself(service_handler_factory, grpc_options, *, event_loop, enable_so_reuseport=False):
        server = object()
        server.add_insecure_port(f"[::]:{grpc_options.port}")

    return {
        "no add_grpc_address": (delete("ray.serve._private.default_impl", "add_grpc_address"),
                                "ray.serve._private.default_impl.add_grpc_address"),
        "add_port_to_grpc_server of 3 arguments": (
            replace("ray.serve._private.replica", "add_port_to_grpc_server", lambda server, address, tls: 0),
            "ray.serve._private.replica.add_port_to_grpc_server"),
        "Ray's uvicorn.Config another class": (replace("ray.serve._private.http_util", "uvicorn", other_uvicorn),
                                               "ray.serve._private.http_util.uvicorn.Config"),
        "Ray's bare Config another class": (replace("ray.serve._private.http_util", "Config", type("Config", (), {})),
                                            "ray.serve._private.http_util.Config"),
        "Config without ssl_ciphers": (replace("uvicorn.config", "Config", type("Config", (), {
            "__init__": lambda self, app, http="auto": None, "load": lambda self: None})),
            "uvicorn.config.Config(http=..., ssl_ciphers=...)"),
        "gRPC ingress bound without add_grpc_address": (
            replace("ray.serve._private.grpc_util", "start_grpc_server", binds_itself),
            "ray.serve._private.grpc_util.start_grpc_server"),
        "HTTP protocol without on_response_complete": (
            lambda mp: mp.delattr(importlib.import_module("uvicorn.protocols.http.httptools_impl").HttpToolsProtocol,
                                  "on_response_complete"),
            "HttpToolsProtocol.on_response_complete"),
    }


@pytest.mark.parametrize("case", ["no add_grpc_address", "add_port_to_grpc_server of 3 arguments",
                                  "Ray's uvicorn.Config another class", "Ray's bare Config another class",
                                  "Config without ssl_ciphers", "gRPC ingress bound without add_grpc_address",
                                  "HTTP protocol without on_response_complete"])
def test_a_missing_patch_target_stops_the_worker_with_one_line(worker, monkeypatch, case):
    """Each way Ray or uvicorn can move what the hook patches: the hook raises (the worker does not start) with one
    line naming both versions and what was not found, having patched nothing; `scc serve`'s own check before Ray
    starts (proxy.preflight) says the same."""
    import ray
    import uvicorn
    from ray.serve._private import default_impl

    pytest.importorskip("httptools")
    break_it, phrase = _mutations()[case]
    break_it(monkeypatch)
    with pytest.raises(SccError) as err:
        worker.setup_worker()
    message = str(err.value)
    assert "\n" not in message and phrase in message, message
    assert f"ray {ray.__version__}" in message and f"uvicorn {uvicorn.__version__}" in message, message
    assert "refusing to start" in message
    assert not getattr(getattr(default_impl, "add_grpc_address", None), "_scc_loopback", False)
    assert not getattr(uvicorn.config.Config.__init__, "_scc_hardened", False)
    with pytest.raises(SccError) as again:
        worker.preflight()
    assert str(again.value) == message


def test_the_hook_refuses_a_worker_without_the_services_environment(worker, monkeypatch):
    from scc.serve.proxy import HEADER_TIMEOUT_ENV

    monkeypatch.delenv(HEADER_TIMEOUT_ENV)
    with pytest.raises(SccError, match=HEADER_TIMEOUT_ENV):
        worker.setup_worker()


# ----------------------------------------------------------------------------------------------------------
# The start-up self-test's checks, against small local servers
# ----------------------------------------------------------------------------------------------------------
def _serve_forever(handle, listen=("127.0.0.1", 0)):
    """A TCP server on a thread: handle(connection) for each connection, on its own thread. Returns (port, stop)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(listen)
    server.listen()
    server.settimeout(0.2)
    done = threading.Event()

    def loop():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
        server.close()

    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1], done.set


def _tls_server(tmp_path, lowest):
    import ssl
    import warnings

    from test_serve_e2e import self_signed

    cert, key = self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = lowest
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")

    def handle(conn):
        try:
            with ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            conn.close()

    return _serve_forever(handle)


def test_self_test_tls_floor(tmp_path):
    """A server that still speaks TLS 1.1 fails the check; one with the service's TLS 1.2 floor passes it."""
    import ssl

    from scc.serve.selftest import tls_floor

    pytest.importorskip("cryptography")
    port, stop = _tls_server(tmp_path, ssl.TLSVersion.TLSv1)
    try:
        failure, _ = tls_floor("127.0.0.1", port)
    finally:
        stop()
    assert failure and "accepted a TLS 1.1 handshake" in failure and "\n" not in failure, failure
    port, stop = _tls_server(tmp_path, ssl.TLSVersion.TLSv1_2)
    try:
        failure, passed = tls_floor("127.0.0.1", port)
    finally:
        stop()
    assert failure is None and "TLS 1.1 refused" in passed, passed
    port, stop = _serve_forever(lambda conn: conn.close())  # no TLS at all: the refusal would prove nothing
    try:
        assert "completes no TLS handshake" in tls_floor("127.0.0.1", port)[0]
    finally:
        stop()


def test_self_test_header_deadline():
    """A server that keeps a stalled request head open fails the check, one that closes it without the read
    deadline's 408 fails too, and one that answers 408 and closes within the deadline passes."""
    from scc.serve.selftest import StalledHeaders

    held = []

    def never(conn):
        held.append(conn)

    def deadline(conn):
        time.sleep(0.3)
        conn.sendall(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        conn.close()

    outcomes = {}
    for name, handle in (("never", never), ("close", lambda conn: conn.close()), ("deadline", deadline)):
        port, stop = _serve_forever(handle)
        try:
            start = time.perf_counter()
            probe = StalledHeaders("127.0.0.1", port, tls=False, header_timeout_s=0.5, slack_s=0.5).start()
            outcomes[name] = (probe.result(), time.perf_counter() - start)
        finally:
            stop()
    for conn in held:
        conn.close()
    assert "kept a connection with an incomplete request head open for 1 s" in outcomes["never"][0]
    assert outcomes["never"][1] < 3
    assert "without the 408" in outcomes["close"][0]
    assert outcomes["deadline"][0] is None


def test_self_test_sockets_off_loopback():
    """A process of the service listening on 0.0.0.0 fails the check under a loopback --host."""
    import subprocess
    import sys

    from scc.serve.selftest import loopback_only

    code = ("import socket, sys, time; s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)")
    for address in ("0.0.0.0", "127.0.0.1"):
        child = subprocess.Popen([sys.executable, "-c", code, address], stdout=subprocess.PIPE, text=True)
        try:
            port = int(child.stdout.readline())
            failure, passed = loopback_only("127.0.0.1", {child.pid})
            other_host = loopback_only("0.0.0.0", {child.pid})
        finally:
            child.kill()
            child.wait(10)
        if address == "0.0.0.0":
            assert failure and f"0.0.0.0:{port}" in failure and "off loopback" in failure, failure
        else:
            assert failure is None and passed == "1 listening sockets on loopback", passed
        assert other_host[0] is None

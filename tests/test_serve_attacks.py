"""What an attacker can try against `scc serve`, in process (no Ray): images whose geometry would make a resize allocate
gigabytes, a failed allocation's message, repeated keys inside one request, a compile cache someone else could write,
a gRPC message sent without the token, hostile gRPC image names, slow bodies and one address taking every slot,
multipart part headers, decoders off the default list, decoding past the deadline, exception text and process details
in answers, forged and stale operator-page cookies. The same attacks against a real service are in
tests/test_serve_e2e.py and tests/test_serve_ui.py."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scc.images import Preprocess
from scc.serve.client import multipart
from scc.serve.front import Front, token_digest
from scc.serve.requests import Item, Limits, RequestError, decode_image, parse_request, split_multipart
from scc.serve.service import Service, service_config

from test_serve import PRE, SIZE, chunks, eager_probs, make_front, png_bytes, png_header

ALLOC_MESSAGE = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 4294967296 bytes.")


def encoded(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A real image of width x height (random pixels) in `fmt`."""
    from PIL import Image

    arr = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service():
    torch.set_num_threads(1)
    return Service(service_config(defense="scc", backend="eager", max_batch=4, max_queue=16, max_images=16))


@pytest.fixture(scope="module")
def images(digits):
    return digits[0][:8]


def stub_front(**cfg) -> Front:
    """A Front whose model answers at once (label "a" for every image)."""
    front = make_front(None, **cfg)

    async def answer(items, budget):
        return [{"name": it.name, "label": "a", "index": 0, "scores": {"a": 1.0}, "key": it.key} for it in items]

    front.call_model = answer
    return front


# ----------------------------------------------------------------------------------------------------------
# Geometry: the largest tensor one request can allocate
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width, height", [(262144, 1), (1, 262144), (2, 131072), (131072, 2), (17, 1)])
def test_images_thinner_than_the_aspect_limit_are_refused_from_their_header(width, height, monkeypatch):
    """A 262144x1 PNG of a few hundred bytes fits the 512^2 pixel budget of a 32-pixel model; the service refuses it
    (413, one line naming the ratio and the limit) from its header, and nothing is decoded."""
    decoded = []
    monkeypatch.setattr(Preprocess, "encoded", lambda self, *a, **k: decoded.append(a) or torch.zeros(3, 32, 32))
    with pytest.raises(RequestError) as err:
        parse_request("image/png", encoded(width, height), {}, PRE, Limits.for_model(SIZE))
    assert err.value.status == 413 and "aspect ratio" in str(err.value) and "16:1" in str(err.value), err.value
    assert "\n" not in str(err.value) and not decoded


def profiled_largest_allocation(run) -> int:
    """The largest single CPU allocation torch makes while `run()` runs (the profiler's memory events, which see
    the allocations inside an operator's kernel too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0] or [0])


@pytest.mark.parametrize("rule, shapes", [
    ("tiny", [(65536, 1), (1, 65536), (3, 65536), (512, 512), (2048, 128), (16, 1)]),
    ("clip", [(512, 1), (1, 512), (2, 2048), (64, 4), (1024, 64), (300, 200)]),
])
def test_the_largest_tensor_of_a_request_is_bounded_by_its_geometry(rule, shapes):
    """Hostile shapes (1xN, Nx1, tiny x huge, at and over the aspect limit, many in one request) through the
    service's parsing: no allocation exceeds largest_tensor_bytes(preprocess, limits), both under the service's
    aspect limit and with that limit lifted (then the model's own 4:1 centre crop is what bounds the resize; without
    it the 1x512 image would make a 224-pixel model's resize allocate 3 x 256 x 131072 floats, 400 MB). The
    many-image request holds the shapes each limit lets through (up to the per-request pixel budget), and every one
    of its images is decoded while the profiler watches."""
    from scc.serve.requests import largest_tensor_bytes

    pre = PRE if rule == "tiny" else Preprocess(224)  # the bundled 32-pixel model; an open_clip model's rule
    for limits in (Limits.for_model(pre.size, max_pixels=2 ** 18),
                   Limits.for_model(pre.size, max_pixels=2 ** 18, max_aspect=1e9)):
        bound = largest_tensor_bytes(pre, limits)
        assert bound <= 3 * 4 * 2 ** 18 + 3 * 4 * 256 * 1025 < 7 * 2 ** 20  # the decoded image or the resize
        seen = []
        for w, h in shapes:
            body = encoded(w, h)

            def parse():
                try:
                    parse_request("image/png", body, {}, pre, limits)
                except RequestError as err:
                    assert err.status == 413 and "aspect ratio" in str(err), err

            seen.append(profiled_largest_allocation(parse))
        allowed = [(w, h) for w, h in shapes if max(w, h) <= limits.max_aspect * min(w, h)]
        form, pixels = [], 0
        for i in range(4 * len(shapes)):  # cycle through what this limit lets through, within the request's budget
            w, h = allowed[i % len(allowed)]
            if len(form) < 12 and pixels + w * h <= limits.max_request_pixels:
                form.append(("image", f"{i}.png", encoded(w, h, seed=i)))
                pixels += w * h
        ctype, body = multipart(form)
        parsed = []
        seen.append(profiled_largest_allocation(lambda: parsed.extend(parse_request(ctype, body, {}, pre, limits))))
        assert len(form) >= 3 and len(parsed) == len(form), (rule, limits.max_aspect, len(form), len(parsed))
        assert all(it.error is None and it.x is not None for it in parsed), [it.error for it in parsed]
        assert seen[-1] > 0, (rule, limits.max_aspect, seen)  # the request's decoding was measured
        assert max(seen) <= bound, (rule, limits.max_aspect, seen, bound)


def test_a_failed_allocation_is_a_500_that_keeps_the_allocators_words_in_the_log(images, monkeypatch, caplog):
    """The resize's allocation fails: the client gets a 500 with a stable code and a request id, never the
    allocator's message; the server log has it, under the same id."""
    def fail(self, x):
        raise RuntimeError(ALLOC_MESSAGE)

    monkeypatch.setattr(Preprocess, "__call__", fail)
    front = make_front(None)
    with caplog.at_level(logging.ERROR, logger="scc.serve"):
        reply = asyncio.run(front.classify({"content-type": "image/png"}, {}, chunks(png_bytes(images[0]))))
    assert reply.status == 500 and set(reply.body) == {"error", "code"} and reply.body["code"] == "internal"
    text = json.dumps(reply.body)
    assert "alloc" not in text.lower() and "4294967296" not in text and "RuntimeError" not in text, text
    rid = reply.body["error"].split("(request ")[1].split(")")[0]
    assert ALLOC_MESSAGE in caplog.text and rid in caplog.text


# ----------------------------------------------------------------------------------------------------------
# Draws: fresh per image
# ----------------------------------------------------------------------------------------------------------
def test_repeated_keys_in_one_request_meet_independent_draws(service, images):
    """?key=7,7,7,7 over four copies of one image: four independent sets of draws by default (four different
    answers), one set under --replay-draws (four equal answers, each equal to the eager module's with the same seed
    and key on the pixels the server decoded)."""
    ctype, body = multipart([("image", f"{i}.png", png_bytes(images[0])) for i in range(4)])

    def ask(front, query):
        return asyncio.run(front.classify({"content-type": ctype}, query, chunks(body)))

    fresh = ask(make_front(service), {"key": ["7,7,7,7"], "top_k": ["10"]})
    replay = ask(make_front(service, replay_draws=True), {"key": ["7,7,7,7"], "seed": ["3"], "top_k": ["10"]})
    assert fresh.status == replay.status == 200
    fresh_scores = [json.dumps(r["scores"], sort_keys=True) for r in fresh.body["results"]]
    replay_scores = [json.dumps(r["scores"], sort_keys=True) for r in replay.body["results"]]
    assert len(set(fresh_scores)) == 4, fresh_scores
    assert len(set(replay_scores)) == 1
    ref = eager_probs(3, 7, decode_image(png_bytes(images[0]), PRE, 10 ** 6))
    labels = service.classifier.labels
    for r in replay.body["results"]:
        got = torch.tensor([r["scores"][lab] for lab in labels])
        assert r["key"] == 7 and r["index"] == int(ref.argmax()), (r, ref)
        assert torch.allclose(got, ref, atol=1e-5), (got, ref)
    assert [r["key"] for r in fresh.body["results"]] == [7] * 4

    seen = []

    async def spy(items, budget):
        seen.extend(it.nonce for it in items)
        return [{"name": it.name, "label": "a", "index": 0, "scores": {"a": 1.0}, "key": it.key} for it in items]

    front = make_front(None)
    front.call_model = spy
    asyncio.run(front.classify({"content-type": ctype}, {"key": ["7,7,7,7"]}, chunks(body)))
    asyncio.run(front.classify({"content-type": ctype}, {"key": ["7,7,7,7"]}, chunks(body)))
    assert len(seen) == 8 and len(set(seen)) == 8 and all(n and len(n) >= 32 for n in seen)


# ----------------------------------------------------------------------------------------------------------
# A refused compile cache is never read
# ----------------------------------------------------------------------------------------------------------
def world_writable(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o777)
    return folder


@pytest.mark.parametrize("given", ["refused folder", "no --compile-cache"])
def test_a_replica_points_inductor_at_a_private_folder(tmp_path, monkeypatch, given):
    """A Ray runtime_env (or the operator's shell) may already name a folder in TORCHINDUCTOR_CACHE_DIR, and without
    it Inductor uses /tmp/torchinductor_<user>, which another user can create first: a replica whose --compile-cache
    is refused, and one without --compile-cache, point Inductor and Triton at a folder of their own, mode 0700."""
    theirs = world_writable(tmp_path / "cc")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(theirs / "triton"))
    s = Service(service_config(defense="none", backend="eager", max_batch=1,
                               compile_cache=str(theirs) if given == "refused folder" else None), warm=False)
    assert s.artifacts_status.startswith("refused" if given == "refused folder" else "no cache"), s.artifacts_status
    private = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert private != theirs and theirs not in private.parents
    st = private.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert Path(os.environ["TRITON_CACHE_DIR"]).parent == private


REPLICA = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    import scc.serve.service as service
    # unfrozen graphs (as a replica with a usable cache compiles them): their generated code is the same in every
    # process, so a planted module sits at the very path Inductor loads (frozen code names weights by address)
    make_runner = service.make_runner
    service.make_runner = lambda *args, **kwargs: make_runner(*args, **{**kwargs, "freeze": False})
    from scc.serve.service import Service, service_config
    folder, mode = sys.argv[1], sys.argv[2]
    if mode == "control":  # a replica that trusted its environment's Inductor folder (what `scc serve` never does)
        service.prepare_compile_cache = lambda folder: (None, "no cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # what the replica's environment says (a Ray runtime_env, a shell)
    s = Service(service_config(defense="none", backend="compiled", max_batch=1, seed=0,
                               compile_cache=folder if mode == "cache" else None))
    print("STATUS", s.artifacts_status)
""")


@pytest.mark.compile
def test_code_planted_in_a_refused_cache_is_never_imported(tmp_path):
    """A compiled replica fills an Inductor cache folder; its entries (generated .py modules at their hashed paths)
    are copied into folders others can write, each with a payload that leaves a mark when imported. A replica given
    such a folder as --compile-cache refuses it and compiles elsewhere: no mark. A replica without --compile-cache
    whose environment names such a folder (TORCHINDUCTOR_CACHE_DIR, as Inductor's default /tmp/torchinductor_<user>
    would be) compiles in its private folder: no mark. The control: a replica that trusts the environment's folder
    imports the planted modules (the paths are the ones Inductor loads for these graphs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def replica(folder: Path, mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", REPLICA, str(folder), mode],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    clean = tmp_path / "clean"
    replica(clean, "control")
    modules = sorted(p.relative_to(clean) for p in clean.rglob("*.py"))
    assert modules, sorted(str(p) for p in clean.rglob("*"))[:20]

    def planted(folder: Path, mark: Path) -> Path:
        shutil.copytree(clean, folder)
        for rel in modules:
            path = folder / rel
            path.write_text(f"open({str(mark)!r}, 'a').write({str(rel)!r} + '\\n')\n" + path.read_text())
        world_writable(folder)
        return folder

    marks = {name: tmp_path / f"imported-{name}" for name in ("control", "cache", "no-cache")}
    replica(planted(tmp_path / "control", marks["control"]), "control")
    assert marks["control"].exists(), "the control: Inductor imports the planted modules from the folder it is given"
    out = replica(planted(tmp_path / "shared" / "cc", marks["cache"]), "cache")
    assert "STATUS refused" in out and "not using the compile cache" in out, out[-2000:]
    assert not marks["cache"].exists(), marks["cache"].read_text()
    out = replica(planted(tmp_path / "default", marks["no-cache"]), "no-cache")
    assert "STATUS no cache" in out, out[-2000:]
    assert not marks["no-cache"].exists(), marks["no-cache"].read_text()


# ----------------------------------------------------------------------------------------------------------
# gRPC: the token before the message is parsed
# ----------------------------------------------------------------------------------------------------------
def test_grpc_checks_the_token_and_the_size_before_parsing(images, monkeypatch):
    from scc.serve import grpc_api

    parsed = []
    real = grpc_api.ClassifyRequest

    class Spy:
        @staticmethod
        def FromString(raw):
            parsed.append(len(raw))
            return real.FromString(raw)

    monkeypatch.setattr(grpc_api, "ClassifyRequest", Spy)
    token = "grpc-token-0123456789"
    front = stub_front(token=token, max_body_bytes=100_000)
    message = real(images=[grpc_api.Image(data=png_bytes(images[0]), key="1")]).SerializeToString()
    for metadata in ({}, {"authorization": "Bearer wrong-token-0123456789"}):
        reply = asyncio.run(front.classify_grpc(metadata, message, "ipv4:127.0.0.1:5000"))
        assert reply.status == 401 and reply.body["code"] == "unauthorized"
    big = asyncio.run(front.classify_grpc({"authorization": f"Bearer {token}"}, b"\0" * 100_001))
    assert big.status == 413 and big.body["code"] == "too_large"
    assert parsed == []  # neither the anonymous nor the oversized message was parsed
    ok = asyncio.run(front.classify_grpc({"authorization": f"Bearer {token}"}, message, "ipv6:[::1]:5000"))
    assert ok.status == 200 and parsed == [len(message)]
    junk = asyncio.run(front.classify_grpc({"authorization": f"Bearer {token}"}, b"\xff\xff\xff"))
    assert junk.status == 400 and "not a ClassifyRequest message" in junk.body["error"]


def test_grpc_image_names_are_sanitised_before_any_use(images, caplog):
    """A gRPC Image.name is the client's, like an HTTP part's filename: 398 characters with a newline and escape
    sequences reach no answer (a 413 or 400 message, a result's name, a bad image's error beside good ones) and no
    log line unsanitised: printable, one line, at most 100 characters, the same rule as HTTP part names."""
    from scc.serve import grpc_api

    hostile = ("evil\n\x1b[31mred\x1b[0m\r" + "x" * 400)[:398]
    shown = "".join(c if c.isprintable() else "?" for c in hostile)[:100]
    front = stub_front()

    def ask(*named):
        message = grpc_api.ClassifyRequest(images=[grpc_api.Image(name=n, data=d, key=str(i))
                                                   for i, (n, d) in enumerate(named)]).SerializeToString()
        return asyncio.run(front.classify_grpc({}, message, "ipv4:127.0.0.1:5000"))

    bomb = png_header(20_000, 20_000)  # over the per-image pixel budget: a 413 from its header
    with caplog.at_level(logging.INFO, logger="scc.serve"):
        too_large = ask((hostile, bomb))
        unreadable = ask((hostile, b"\x89PNG\r\n\x1a\n not an image"))
        mixed = ask((hostile, png_bytes(images[0])), (hostile, bomb))
    assert (too_large.status, unreadable.status, mixed.status) == (413, 400, 200)
    good, bad = mixed.body["results"]
    assert good["name"] == shown and bad["name"] == shown and len(shown) == 100
    texts = [too_large.body["error"], unreadable.body["error"], good["name"], bad["name"], bad["error"],
             caplog.text]
    for text in texts:
        assert "\x1b" not in text and "\r" not in text and "x" * 101 not in text, text[:300]
    for text in texts[:-1]:
        assert "\n" not in text, text
    assert shown in too_large.body["error"] and shown in bad["error"]


def test_plaintext_grpc_off_loopback_needs_an_explicit_flag(capsys):
    from scc.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--grpc-port", "9001", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--insecure-grpc" in err and "plaintext" in err
    assert main(["serve", "--host", "0.0.0.0", "--grpc-port", "9001", "--insecure-grpc", "--print-config"]) == 0
    assert main(["serve", "--host", "127.0.0.1", "--grpc-port", "9001", "--print-config"]) == 0


# ----------------------------------------------------------------------------------------------------------
# Slow clients and one address
# ----------------------------------------------------------------------------------------------------------
def test_slow_bodies_hold_no_admission_slot(images):
    """Admission (max_queue x replicas = 4 here) comes after the body: six clients trickling their bodies do not
    keep a seventh, whole request out, and each of them gets its 408 in time."""
    body = png_bytes(images[0])

    async def main():
        front = stub_front(max_queue=4, max_batch=4, max_images=4, body_timeout_s=1.0)
        slow = [asyncio.ensure_future(front.classify({"content-type": "image/png"}, {},
                                                     chunks(body[:10], body[10:], pause=5.0)))
                for _ in range(6)]
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        good = await front.classify({"content-type": "image/png"}, {}, chunks(body))
        return good, time.perf_counter() - start, await asyncio.gather(*slow)

    good, seconds, slow = asyncio.run(main())
    assert good.status == 200 and seconds < 0.5, (good, seconds)
    assert [r.status for r in slow] == [408] * 6 and slow[0].body["code"] == "timeout"


def test_one_address_gets_at_most_max_client_requests(images):
    body = png_bytes(images[0])

    async def main():
        front = stub_front(max_client_requests=2, body_timeout_s=1.0)
        held = [asyncio.ensure_future(front.classify({"content-type": "image/png"}, {},
                                                     chunks(body[:10], body[10:], pause=0.3), "10.0.0.1"))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await front.classify({"content-type": "image/png"}, {}, chunks(body), "10.0.0.1")
        other = await front.classify({"content-type": "image/png"}, {}, chunks(body), "10.0.0.2")
        done = await asyncio.gather(*held)
        after = await front.classify({"content-type": "image/png"}, {}, chunks(body), "10.0.0.1")
        return front, third, other, done, after

    front, third, other, done, after = asyncio.run(main())
    assert third.status == 429 and third.headers["Retry-After"] == "1" and third.body["code"] == "too_many_requests"
    assert "--max-client-requests" in third.body["error"]
    assert other.status == 200 and [r.status for r in done] == [200, 200] and after.status == 200
    assert front.clients == {} and front.counts["busy_client"] == 1


# ----------------------------------------------------------------------------------------------------------
# Smaller findings
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "PPM"])
def test_only_png_jpeg_and_webp_by_default(fmt):
    data = encoded(9, 7, fmt)
    with pytest.raises(RequestError) as err:
        parse_request("application/octet-stream", data, {}, PRE, Limits.for_model(SIZE))
    assert err.value.status == 400 and "accepted formats: PNG, JPEG, WEBP" in str(err.value)
    for ok in ("PNG", "JPEG", "WEBP"):
        assert parse_request("application/octet-stream", encoded(9, 7, ok), {}, PRE, Limits.for_model(SIZE))[0].x \
            is not None
    opened = Limits.for_model(SIZE, formats=f"png,jpeg,webp,{fmt.lower()}")
    assert parse_request("application/octet-stream", data, {}, PRE, opened)[0].x.shape == (3, SIZE, SIZE)


def test_multipart_part_headers_are_bounded():
    image = encoded(8, 8)

    def form(head: bytes) -> tuple[str, bytes]:
        return ("multipart/form-data; boundary=b",
                b"--b\r\n" + head + b"\r\n\r\n" + image + b"\r\n--b--\r\n")

    disposition = b'Content-Disposition: form-data; name="image"; filename="a.png"'
    cases = {"long": (disposition + b"\r\nX-Pad: " + b"x" * 2000, 413, "header block has"),
             "many": (disposition + b"".join(b"\r\nX-%d: 1" % i for i in range(20)), 413, "header lines"),
             "twice": (disposition + b"\r\n" + disposition, 400, "two Content-Disposition")}
    for case, (head, status, words) in cases.items():
        start = time.perf_counter()
        with pytest.raises(RequestError) as err:
            split_multipart(*form(head), max_parts=8)
        assert err.value.status == status and words in str(err.value), (case, err.value)
        assert time.perf_counter() - start < 0.1
    ctype, body = form(disposition + b"\r\nContent-Type: image/png")
    assert [p[:2] for p in split_multipart(ctype, body, 8)] == [("image", "a.png")]
    huge = b"--b\r\n" + disposition + b"\r\nX: " + b"y" * (16 << 20) + b"\r\n\r\n\r\n--b--\r\n"
    start = time.perf_counter()
    with pytest.raises(RequestError, match="header block has"):
        split_multipart("multipart/form-data; boundary=b", huge, 8)
    assert time.perf_counter() - start < 0.5  # one search, not millions of header lines


def test_decoding_runs_inside_the_deadline(images, monkeypatch):
    """Decoding is part of the request's deadline: a request whose images take longer to decode than its
    deadline gets a retryable 503 on time, and the remaining images are not decoded."""
    calls = []
    real = Preprocess.encoded

    def slow(self, *args, **kwargs):
        calls.append(time.perf_counter())
        time.sleep(0.4)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Preprocess, "encoded", slow)
    front = stub_front(timeout_s=1.0)
    ctype, body = multipart([("image", f"{i}.png", png_bytes(images[i])) for i in range(8)])
    start = time.perf_counter()
    reply = asyncio.run(front.classify({"content-type": ctype}, {}, chunks(body)))
    seconds = time.perf_counter() - start
    assert reply.status == 503 and reply.headers["Retry-After"] == "1" and reply.body["code"] == "deadline"
    assert seconds < 1.3, seconds
    time.sleep(0.5)
    assert len(calls) <= 4, len(calls)  # the decoding thread stopped at the deadline too


def test_clients_get_stable_codes_and_no_exception_text(service, images, caplog):
    """Every error carries {"error", "code"}; a decoder's or the engine's exception text stays in the log."""
    front = make_front(service)
    reply = asyncio.run(front.classify({"content-type": "image/png"}, {}, chunks(b"\x89PNG\r\n\x1a\n broken")))
    assert reply.status == 400 and reply.body["code"] == "bad_request"
    assert "not a readable image; accepted formats: PNG, JPEG, WEBP" in reply.body["error"]
    assert "Error" not in reply.body["error"] and "BytesIO" not in reply.body["error"]
    guarded = make_front(service, token="t" * 20, max_body_bytes=1000)
    token = {"authorization": "Bearer " + "t" * 20}
    for status, code, headers, body in (
            (401, "unauthorized", {"content-type": "image/png"}, png_bytes(images[0])),
            (413, "too_large", {"content-type": "image/png", **token}, b"x" * 1001),
            (415, "unsupported_media_type", {"content-type": "text/plain", **token}, b"hi"),
            (400, "bad_request", {"content-type": "image/png", **token}, png_bytes(images[0])[:60])):
        r = asyncio.run(guarded.classify(headers, {}, chunks(body)))
        assert (r.status, r.body["code"]) == (status, code) and set(r.body) == {"error", "code"}, r
    runner = service.runner

    def broken(x, draws=None):
        raise RuntimeError("secret detail: /home/someone/model.bin")

    service.runner = broken
    try:
        with caplog.at_level(logging.ERROR, logger="scc.serve"):
            res = service.handle_batch([Item(name="a", x=images[0])])
    finally:
        service.runner = runner
    assert res[0]["error_kind"] == "internal" and "secret detail" not in res[0]["error"]
    assert "secret detail" in caplog.text


def walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}")
            yield f"{path}.{k}", k
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_info_shows_no_pids_and_no_paths(service, tmp_path):
    """/v1/info: no process id, no file path (the compile cache's artifact by its name only); the ingress's and
    the replicas' random ids name the processes instead."""
    front = make_front(service)
    info = asyncio.run(front.info())
    values = list(walk(info))
    assert not [p for p, v in values if v == "pid" or p.endswith(".pid")], values
    assert not [(p, v) for p, v in values if isinstance(v, str) and (v.startswith("/") or str(tmp_path) in v
                                                                     or os.path.expanduser("~") in v)]
    assert info["replica"]["id"] and info["ingress"]["id"]
    assert info["limits"]["max_aspect"] == 16.0 and info["limits"]["image_formats"] == ["PNG", "JPEG", "WEBP"]


def test_print_config_shows_no_token_digest(tmp_path, capsys):
    from scc.cli import main

    token = tmp_path / "token"
    token.write_text("a-long-enough-token-0123\n")
    os.chmod(token, 0o600)
    assert main(["serve", "--print-config", "--token-file", str(token)]) == 0
    out = capsys.readouterr().out
    assert token_digest("a-long-enough-token-0123") not in out and "a-long-enough-token" not in out
    assert "token_sha256" not in out and f"token_file: {token}" in out
    yaml = pytest.importorskip("yaml")
    args = yaml.safe_load(out)["applications"][0]["args"]
    front = Front(service_config(args), None, None)  # a `serve deploy` ingress reads the token from its file
    assert front.authorized("Bearer a-long-enough-token-0123") and not front.authorized("Bearer other-token-00000")


def test_operator_page_cookies_expire_and_cannot_be_forged():
    """The session cookie of --ui: good for MAX_AGE_S (12 h) after it was issued and refused after; refused when
    made from the token's digest alone (the fixed value a cookie used to have), under another service start's key,
    for another token, with a moved issue time, from the future, or malformed."""
    import hashlib
    import hmac

    from scc.serve import ui

    digest = bytes.fromhex(token_digest("ui-token-0123456789abcdef"))
    key, now = ui.session_key(), time.time()
    value = ui.session_value(key, digest, now)
    cookie = lambda v: {ui.COOKIE: v}
    assert ui.MAX_AGE_S == 12 * 3600 and f"Max-Age={ui.MAX_AGE_S}" in ui.cookie_header(key, digest, False)
    assert ui.signed_in(cookie(value), digest, key, now) and ui.signed_in(cookie(value), digest, key)
    assert ui.signed_in(cookie(value), digest, key, now + ui.MAX_AGE_S - 1)
    assert not ui.signed_in(cookie(value), digest, key, now + ui.MAX_AGE_S + 1)  # too old
    forged = hmac.new(digest, b"scc-operator-page-v1", hashlib.sha256).hexdigest()
    assert not ui.signed_in(cookie(forged), digest, key, now)
    assert not ui.signed_in(cookie(f"{int(now)}.{forged}"), digest, key, now)
    assert ui.session_key() != key and not ui.signed_in(cookie(value), digest, ui.session_key(), now)
    assert not ui.signed_in(cookie(value), bytes.fromhex(token_digest("another-token-0123456789")), key, now)
    issued, mac = value.split(".")
    assert not ui.signed_in(cookie(f"{int(issued) + 3600}.{mac}"), digest, key, now + 3600 + ui.MAX_AGE_S - 10)
    future = ui.session_value(key, digest, now + 3600)
    assert not ui.signed_in(cookie(future), digest, key, now)
    for junk in ("", ".", "abc", f"{issued}.", f".{mac}", f"{issued}.{mac}x", "\u0661\u0662." + mac,
                 "9" * 40 + "." + mac, issued + "." + "\u00e9" * 64):
        assert not ui.signed_in(cookie(junk), digest, key, now), junk
    assert ui.signed_in({}, None, key)  # no server token: the page is open


def test_read_back_names_every_option_serve_does_not_run_with():
    """What `scc serve` compares after joining Serve: asked HTTPS on 127.0.0.1:8000 and gRPC on 9000; a Serve that
    already ran plaintext on 0.0.0.0:8001 without the gRPC servicer differs in each of them."""
    from scc.serve.app import GRPC_SERVICER, grpc_options, http_options, option_mismatches

    asked_http = http_options("127.0.0.1", 8000, 30.0, "cert.pem", "key.pem")
    asked_grpc = grpc_options(9000, 30.0)
    same = {"http": {**asked_http, "keep_alive_timeout_s": 90, "root_path": ""},
            "grpc": {"port": 9000, "grpc_servicer_functions": [GRPC_SERVICER], "request_timeout_s": 35.0}}
    assert option_mismatches(asked_http, asked_grpc, same) == []
    other = {"http": {"host": "0.0.0.0", "port": 8001, "request_timeout_s": 35}, "grpc": {"port": 9000}}
    found = option_mismatches(asked_http, asked_grpc, other)
    assert [m.split(" (")[0].rsplit(" ", 1)[0] for m in found] == [
        "HTTP ssl_certfile", "HTTP ssl_keyfile", "HTTP host", "HTTP port", "gRPC servicers"], found
    assert option_mismatches(http_options("127.0.0.1", 8000, 30.0), None, {"http": {
        **http_options("127.0.0.1", 8000, 30.0), "ssl_certfile": "/elsewhere/cert.pem"}}) != []

"""Property-based tests (hypothesis) of what a hostile client controls: bodies, multipart structure, content types,
headers and query strings. Parsing either yields images or refuses with a 4xx and one line; the front door never
answers 5xx. The same strategies drive the HTTP fuzz against the real service in tests/test_serve_e2e.py."""
from __future__ import annotations

import asyncio
import io
import urllib.parse

import numpy as np
import pytest

from scc.serve.client import multipart
from scc.serve.requests import Limits, RequestError, parse_request
from scc.serve.service import service_config

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from test_serve import PRE, SIZE, animated_gif, png_header  # noqa: E402

NAMES = ["seed", "key", "top_k", "timeout_ms", "topk", "", "key[]", "s\u00e9ed"]
TYPES = ["image/png", "image/jpeg", "application/octet-stream", "multipart/form-data", "text/plain", "",
         "image/", "multipart/form-data; boundary=", "multipart/form-data; boundary=\"x\"", "IMAGE/PNG; q=1",
         "multipart/form-data; boundary=" + "b" * 80]


def tiny_images() -> list[bytes]:
    from PIL import Image

    out = []
    rng = np.random.default_rng(0)
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray((rng.random((9, 7, 3)) * 255).astype(np.uint8)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def mutated(data: bytes):
    """A valid image with bytes flipped, truncated or extended."""
    return st.one_of(
        st.integers(0, len(data)).map(lambda n: data[:n]),
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda flips: bytes(b if i not in dict(flips) else dict(flips)[i] for i, b in enumerate(data))),
        st.binary(max_size=64).map(lambda tail: data + tail))


def queries():
    """Mostly well-formed (known names, one value each), sometimes anything."""
    odd = st.one_of(st.text(max_size=30), st.integers(-10 ** 20, 10 ** 20).map(str),
                    st.sampled_from(["1", "0", "3", "1000", "abc", "1,2", ",", "", "9" * 40, "k\nx", "\u00e9"]))
    sane = st.fixed_dictionaries({}, optional={
        "key": st.lists(st.one_of(st.integers(0, 10 ** 6).map(str), st.text("abc-_", min_size=1, max_size=8)),
                        min_size=1, max_size=3).map(lambda ks: [",".join(ks)]),
        "top_k": st.integers(1, 12).map(lambda k: [str(k)]),
        "seed": st.integers(0, 2 ** 63 - 1).map(lambda k: [str(k)])})
    anything = st.dictionaries(st.sampled_from(NAMES), st.lists(odd, min_size=1, max_size=3), max_size=4)
    return st.one_of(sane, sane, sane, anything)


def query_strings():
    return queries().map(lambda q: ("?" + urllib.parse.urlencode(q, doseq=True)) if q else "")


def bodies(pngs: list[bytes]):
    """(Content-Type, body): raw bytes, broken and valid images, claimed sizes, animated GIFs, multipart forms with
    random parts, names and boundaries, and many-part forms."""
    images = tiny_images() + list(pngs)
    one_image = st.one_of(st.sampled_from(images), st.sampled_from(images).flatmap(mutated), st.binary(max_size=200),
                          st.tuples(st.integers(0, 70_000), st.integers(0, 70_000)).map(lambda wh: png_header(*wh)),
                          st.just(animated_gif_bytes()))
    part = st.tuples(st.sampled_from(["image", "image", "file", ""]), st.text(max_size=12), one_image)
    form = st.lists(part, max_size=6).map(lambda ps: multipart([(n, f, d) for n, f, d in ps]))
    many = st.integers(50, 400).map(lambda n: multipart([("image", f"{i}", b"") for i in range(n)]))
    raw = st.tuples(st.sampled_from(TYPES), st.one_of(one_image, st.binary(max_size=300)))
    odd_form = st.tuples(st.sampled_from(TYPES[3:4]), st.binary(max_size=300))
    return st.one_of(raw, form, many, odd_form)


def animated_gif_bytes() -> bytes:
    import torch

    g = torch.Generator().manual_seed(0)
    return animated_gif([torch.rand(3, 8, 8, generator=g) for _ in range(3)])


LIMITS = Limits.for_model(SIZE, max_body_bytes=100_000, max_images=16)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies([]), query=queries(), replay=st.booleans())
def test_parsing_yields_images_or_a_4xx(body, query, replay):
    ctype, data = body
    try:
        items = parse_request(ctype, data, query, PRE, LIMITS, replay)
    except RequestError as err:
        assert 400 <= err.status < 500 and "\n" not in str(err), err
        return
    assert 1 <= len(items) <= LIMITS.max_images
    assert any(it.error is None for it in items)
    for it in items:
        assert (it.x is None) == (it.error is not None)
        if it.x is not None:
            assert it.x.shape == (3, SIZE, SIZE) and 0 <= float(it.x.min()) and float(it.x.max()) <= 1


def stub_front(**cfg):
    from scc.serve.front import Front, token_digest

    async def call_model(items, budget):
        return [{"name": it.name, "label": "a", "index": 0, "scores": {"a": 1.0}, "key": it.key} for it in items]

    async def describe():
        return {"model": "m", "defense": "d", "backend": "b", "image_size": SIZE, "labels": ["a", "b"], "preprocess": PRE.to_dict()}

    cfg = service_config(**{"max_images": 16, "max_body_bytes": 100_000, "body_timeout_s": 1.0,
                            "token_sha256": token_digest("fuzz-token-0123456789"), **cfg})
    return Front(cfg, call_model, describe)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies([]), query=queries(),
       headers=st.dictionaries(st.sampled_from(["content-length", "authorization", "content-type", "x-other"]),
                               st.one_of(st.text(max_size=40), st.sampled_from(
                                   ["Bearer fuzz-token-0123456789", "bearer fuzz-token-0123456789", "-1", "0",
                                    "99999999999999999999", " 12 "])), max_size=4))
def test_front_door_never_answers_5xx(body, query, headers):
    ctype, data = body
    headers = {"content-type": ctype, "authorization": "Bearer fuzz-token-0123456789", **headers}

    async def chunks():
        yield data

    reply = asyncio.run(stub_front().classify(headers, query, chunks()))
    assert reply.status == 200 or 400 <= reply.status < 500, reply
    if reply.status != 200:
        assert set(reply.body) == {"error", "code"} and "\n" not in reply.body["error"]

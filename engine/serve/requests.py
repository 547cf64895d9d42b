"""Request parsing for `scc serve`, plain functions tested without Ray: query + body -> `Item`s, with every limit
checked before the work it bounds.

    items = parse_request(content_type, body, query, clf.preprocess, limits=Limits.for_model(32))

Order of the checks (each refusal one line, a 4xx): body bytes; the query (seed only in replay mode, keys, top_k);
the multipart structure (part count bounded while splitting, each part's header block bounded in bytes and lines);
every image's header (format allow-list, width x height against the per-image pixel budget, the long side against
max_aspect x the short side) and the request's total pixels against the per-request budget -- all before a single
pixel is decoded; then decoding, image by image, until the request's deadline. One `Item` per image; a part that
cannot be used is an Item with its error (the others still run); a request with nothing usable is a `RequestError`.

Budgets are sized to the model: an image is resized to the model's input (S x S) anyway, so by default one image may
have at most (16 S)^2 pixels and one request 4 (16 S)^2 (S = 224: 12.8 and 51 megapixels); decoding costs time and
memory in proportion to pixels (PNG ~36 ns/pixel here), not to the bytes sent. The geometry is bounded too: an image
whose long side exceeds max_aspect (16) x its short side is refused from its header, and the model's own rule
(scc.images.Preprocess) centre-crops the rest to at most 4:1 before resizing, so no resize grows a thin image into a
large tensor. `largest_tensor_bytes(preprocess, limits)` is the resulting bound on any one tensor a request
allocates (the decoded float image or the resize's output).

Messages are the client's: they name the image, the bad value and what to do, never a decoder's or allocator's text
(that goes to the server log, logger "scc.serve").
"""
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import torch

from .. import images
from ..errors import SccError
from ..images import ImageError, Preprocess

IMAGE_FIELD = "image"
# decoders a client may reach by default: PNG, JPEG and WebP (PIL also opens EPS through Ghostscript, PSD, ICO...)
FORMATS = ("PNG", "JPEG", "WEBP")
# the others a server may add with --image-formats (BMP's RLE decoder is pure Python; TIFF has many codecs)
OPTIONAL_FORMATS = ("GIF", "BMP", "TIFF", "PPM")
MAX_KEY_CHARS = 200
MAX_QUERY_VALUES = 1024  # query values in all (keys included)
REFUSE_ASPECT = 16.0  # the service refuses (413, from the header) an image whose long side is over this many
# times its short side (--max-aspect); below it, scc.images.MAX_ASPECT (4) is the centre crop every entry point makes
MAX_PART_HEADER_BYTES = 1024  # one multipart part's header block
MAX_PART_HEADERS = 8  # header lines in one multipart part
FLOAT_BYTES = 4
log = logging.getLogger("scc.serve")

# the stable code of each status a client can meet; the message may change, the code does not
CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         408: "timeout", 413: "too_large", 415: "unsupported_media_type", 422: "bad_request",
         429: "too_many_requests", 500: "internal", 503: "unavailable"}


class RequestError(SccError):
    """A request the service refuses: `status` (4xx, or 503 for a deadline), a one-line reason and a stable `code`."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")


def image_formats(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """The decoder allow-list from --image-formats ("png,jpeg,webp,gif"; None: the default PNG, JPEG, WebP)."""
    if text is None or text == "":
        return FORMATS
    names = [t.strip().upper() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    names = ["JPEG" if n == "JPG" else n for n in names]
    known = FORMATS + OPTIONAL_FORMATS
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SccError(f"image formats {unknown or text!r}: choose from {', '.join(f.lower() for f in known)}")
    return tuple(dict.fromkeys(names))


@dataclass
class Item:
    """One image of a request, on its way to a batch."""
    name: str  # "body" or the multipart part's filename / "image[i]"
    x: torch.Tensor | None = None  # (3, S, S) in [0,1]
    seed: int | None = None  # replay mode: the client's seed (None: the service's)
    key: Hashable | None = None  # the client's key (None: a fresh uuid)
    top_k: int | None = None
    error: str | None = None
    error_kind: str | None = None
    nonce: str | None = None  # fresh draws: the request's secret, mixed into (service seed, key)
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # time.monotonic() after which the replica drops it unanswered


@dataclass(frozen=True)
class Limits:
    """What one request may cost. `for_model(S, ...)` sizes the pixel budgets to the model's input."""
    max_body_bytes: int = 16 * 2 ** 20
    max_pixels: int = (16 * 224) ** 2  # one image, from its header, before decoding
    max_request_pixels: int = 4 * (16 * 224) ** 2  # every image of a request together
    max_images: int = 64
    max_top_k: int = 1000
    max_aspect: float = REFUSE_ASPECT  # long side / short side, from the header
    formats: tuple = FORMATS  # PIL format names the decoders may be given
    max_part_header_bytes: int = MAX_PART_HEADER_BYTES
    max_part_headers: int = MAX_PART_HEADERS

    @classmethod
    def for_model(cls, size: int, max_body_bytes: int = 16 * 2 ** 20, max_pixels: int | None = None,
                  max_request_pixels: int | None = None, max_images: int = 64, max_top_k: int = 1000,
                  max_aspect: float = REFUSE_ASPECT, formats: Sequence[str] | None = None) -> "Limits":
        per = max_pixels or (16 * size) ** 2
        return cls(max_body_bytes, per, max_request_pixels or 4 * per, max_images, max_top_k, float(max_aspect),
                   image_formats(formats))


def largest_tensor_bytes(preprocess: Preprocess, limits: Limits) -> int:
    """The largest tensor one image of a request can make the service allocate, in bytes: the decoded float image
    (3 x max_pixels) or the resize's output (the short side at the model's resize size, the long side at most
    min(limits.max_aspect, preprocess.max_aspect) times it), whichever is larger. Images are decoded one at a time."""
    inner = preprocess.size - 2 * preprocess.frame
    short = max(inner, round(inner / preprocess.crop))
    aspect = min(limits.max_aspect, preprocess.max_aspect)
    long = max(inner, math.ceil(aspect * short) + 1)
    return 3 * FLOAT_BYTES * max(limits.max_pixels, short * long)


# ----------------------------------------------------------------------------------------------------------
# Query
# ----------------------------------------------------------------------------------------------------------
def parse_key(text: str) -> Hashable:
    """A key from a query string: decimal integers are ints (like a dataset index), anything else a string."""
    text = text.strip()
    if not text or len(text) > MAX_KEY_CHARS:
        raise RequestError(400, f"key must be 1-{MAX_KEY_CHARS} characters, got {len(text)}")
    return int(text) if re.fullmatch(r"-?\d{1,18}", text) else text


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name) or []
    if len(values) > 1:
        raise RequestError(400, f"query parameter {name!r} given {len(values)} times, expected once")
    return values[0] if values else None


def _int_query(query: Mapping[str, Sequence[str]], name: str, lo: int, hi: int, shown: str) -> int | None:
    """The integer query parameter `name` in lo..hi (None when absent), or a 400 naming it."""
    value = _one(query, name)
    if value is None:
        return None
    text = value.strip()
    if not re.fullmatch(r"[+-]?\d{1,30}", text):
        raise RequestError(400, f"{name} must be an integer, got {value[:40]!r}")
    number = int(text)
    if not lo <= number <= hi:
        raise RequestError(400, f"{name} must lie in {shown}, got {text[:40]}")
    return number


QUERY_NAMES = ("seed", "key", "top_k", "timeout_ms")


def parse_query(query: Mapping[str, Sequence[str]], max_top_k: int, replay: bool = True,
                max_keys: int = 64) -> tuple[int | None, list | None, int | None]:
    """(seed, keys or None, top_k) from the query parameters (each name -> its list of values; timeout_ms is the
    front door's). A `seed` is refused (403) unless the server replays client draws: whoever picks the seed knows
    every draw. Unknown parameters are refused (400), so a misspelt one is not silently ignored."""
    unknown = sorted(set(query) - set(QUERY_NAMES))
    if unknown:
        raise RequestError(400, f"unknown query parameter(s) {[u[:40] for u in unknown[:5]]}; known: "
                                f"{', '.join(QUERY_NAMES)}")
    if sum(len(v) for v in query.values()) > MAX_QUERY_VALUES:
        raise RequestError(400, f"more than {MAX_QUERY_VALUES} query values")
    if query.get("seed") and not replay:
        raise RequestError(403, "this server draws fresh randomness for every request and refuses client-chosen "
                                "seeds (a known seed is a known-draws attack); drop ?seed=, or start the server "
                                "with --replay-draws for reproducible answers")
    seed = _int_query(query, "seed", 0, 2 ** 63 - 1, "[0, 2**63)")
    keys = None
    if query.get("key"):
        raw = [k for v in query["key"] for k in v.split(",")]
        if len(raw) > max_keys:
            raise RequestError(400, f"{len(raw)} keys exceed the limit of {max_keys} (one per image)")
        keys = [parse_key(k) for k in raw]
    top_k = _int_query(query, "top_k", 1, max_top_k, f"1..{max_top_k}")
    return seed, keys, top_k


# ----------------------------------------------------------------------------------------------------------
# Body
# ----------------------------------------------------------------------------------------------------------
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def _params(header_value: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _PARAM.finditer(header_value)}


def split_multipart(content_type: str, body: bytes, max_parts: int, max_header_bytes: int = MAX_PART_HEADER_BYTES,
                    max_headers: int = MAX_PART_HEADERS) -> list[tuple[str, str | None, bytes]]:
    """multipart/form-data -> [(field name, filename, bytes)] in one linear pass; more than `max_parts` parts is a
    413 as soon as the next one starts (a body of a million empty parts costs microseconds, not a parser's time).
    A part's header block over `max_header_bytes` or `max_headers` lines, or with two Content-Disposition lines, is
    refused before its lines are read."""
    boundary = _params(content_type).get("boundary")
    if not boundary or len(boundary) > 70:
        raise RequestError(400, "multipart body without a valid boundary (1-70 characters) in its Content-Type")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    pos = body.find(delimiter)
    if pos < 0:
        raise RequestError(400, "malformed multipart body: no boundary line")
    parts = []
    while True:
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise RequestError(400, "malformed multipart body: a boundary line without its line end")
        start = eol + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise RequestError(400, "malformed multipart body: no closing boundary")
        if len(parts) >= max_parts:
            raise RequestError(413, f"more than {max_parts} multipart parts")
        if body.startswith(b"\r\n", start):  # a part without headers starts with its blank line
            head, data = b"", body[start + 2:end]
        else:
            blank = body.find(b"\r\n\r\n", start, end)
            if blank < 0:  # no blank line: no header block, all data (a nameless part, ignored)
                head, data = b"", body[start:end]
            elif blank - start > max_header_bytes:
                raise RequestError(413, f"multipart part {len(parts)}: its header block has {blank - start} bytes, "
                                        f"over the limit of {max_header_bytes}; send short part headers")
            else:
                head, data = body[start:blank], body[blank + 4:end]
        if head.count(b"\r\n") + 1 > max_headers:
            raise RequestError(413, f"multipart part {len(parts)}: more than {max_headers} header lines; send "
                                    "Content-Disposition and Content-Type only")
        name, filename, seen = "", None, False
        for line in head.split(b"\r\n") if head else ():
            hname, _, value = line.decode("latin-1").partition(":")
            if hname.strip().lower() == "content-disposition":
                if seen:
                    raise RequestError(400, f"multipart part {len(parts)}: two Content-Disposition headers; send one")
                seen = True
                params = _params(value)
                name, filename = params.get("name", ""), params.get("filename")
        parts.append((name, filename, data))
        pos = end + 2


def _shown(name: str) -> str:
    """A client-chosen image name (an HTTP part's filename, a gRPC Image.name) as the service may use it anywhere --
    answers, error messages, logs: printable, one line, at most 100 characters. Every name goes through it before
    any use (parse_parts, classify_grpc and the image functions below apply it again: it is idempotent)."""
    return "".join(c if c.isprintable() else "?" for c in str(name)[:100])


def image_parts(content_type: str | None, body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    """The request's images as [(name, encoded bytes)]: the whole body, or the `image` parts of a form."""
    if not body:
        raise RequestError(400, "empty body: send one image (Content-Type image/*) or a multipart form with "
                                f"'{IMAGE_FIELD}' parts")
    ctype = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parts = [(_shown(filename) if filename else f"{IMAGE_FIELD}[{i}]", data)
                 for i, (name, filename, data) in enumerate(
                     p for p in split_multipart(content_type, body, limits.max_images + 8,
                                                limits.max_part_header_bytes, limits.max_part_headers)
                     if p[0] == IMAGE_FIELD)]
        if not parts:
            raise RequestError(400, f"multipart body has no '{IMAGE_FIELD}' part")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        parts = [("body", body)]
    else:
        raise RequestError(415, f"unsupported Content-Type {ctype[:60]!r}: send image/*, application/octet-stream "
                                "or multipart/form-data")
    return parts


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------
def _request_error(err: ImageError, name: str, formats: Sequence[str]) -> RequestError:
    """The client's message for an unusable image: our own budget text, or a stable "not a readable image" naming
    the accepted formats (the decoder's own text goes to the server log only). `name` is already `_shown`."""
    if err.too_large:
        return RequestError(413, str(err))
    log.info("image %s not decoded: %s", name, err)
    return RequestError(400, f"{name}: not a readable image; accepted formats: {', '.join(formats)}")


def image_size(data: bytes, name: str, limits: Limits) -> tuple[int, int]:
    """(width, height) from the image's header, nothing decoded; RequestError 400 when unreadable or not an allowed
    format, 413 when over the per-image pixel budget or the aspect-ratio limit."""
    name = _shown(name)
    try:
        w, h = images.image_size(data, name, limits.max_pixels, limits.formats)
    except ImageError as err:
        raise _request_error(err, name, limits.formats) from None
    if max(w, h) > limits.max_aspect * min(w, h):
        raise RequestError(413, f"{name}: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.4g}:1, "
                                f"over the limit of {limits.max_aspect:g}:1; crop it to at most "
                                f"{limits.max_aspect:g}:1")
    return w, h


def image_pixels(data: bytes, name: str, max_pixels: int, formats: Sequence[str] = FORMATS) -> int:
    """width x height from the image's header (RequestError 400/413 when unreadable or over the budget)."""
    name = _shown(name)
    try:
        return images.image_pixels(data, name, max_pixels, formats)
    except ImageError as err:
        raise _request_error(err, name, formats) from None


def decode_image(data: bytes, preprocess: Preprocess, max_pixels: int, name: str = "image",
                 formats: Sequence[str] = FORMATS) -> torch.Tensor:
    """Encoded image bytes -> the model's input (3, S, S) in [0,1] through its own preprocessing (scc.images, the
    one `scc classify` and `scc eval` use); RequestError when unusable or over the per-image pixel budget (checked
    from the header first)."""
    name = _shown(name)
    try:
        return preprocess.encoded(data, name, max_pixels, formats)
    except ImageError as err:
        raise _request_error(err, name, formats) from None


def parse_request(content_type: str | None, body: bytes, query: Mapping[str, Sequence[str]], preprocess: Preprocess,
                  limits: Limits | None = None, replay: bool = True, deadline: float | None = None) -> list[Item]:
    """An HTTP request -> its Items (one per image, in order), every budget checked before decoding. RequestError
    (4xx) when the request as a whole is unusable: too large, no body, an unsupported type, a bad query, a pixel
    budget exceeded, or not one readable image; 503 when `deadline` (time.monotonic()) passes while decoding."""
    limits = limits or Limits.for_model(preprocess.size)
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}")
    seed, keys, top_k = parse_query(query, limits.max_top_k, replay, limits.max_images)
    return parse_parts(image_parts(content_type, body, limits), preprocess, limits, seed, keys, top_k, deadline)


def parse_parts(parts: Sequence[tuple[str, bytes]], preprocess: Preprocess, limits: Limits, seed: int | None = None,
                keys: Sequence[Hashable] | None = None, top_k: int | None = None,
                deadline: float | None = None) -> list[Item]:
    """[(name, encoded bytes)] -> Items: every header read and every budget checked (pixels per image and per
    request, aspect ratio, format), then decoded one image at a time while `deadline` (time.monotonic()) has not
    passed (the HTTP body and the gRPC message both end here). Names are sanitised (`_shown`) before any use."""
    parts = [(_shown(name), data) for name, data in parts]
    if not parts:
        raise RequestError(400, "no image in the request")
    if len(parts) > limits.max_images:
        raise RequestError(413, f"{len(parts)} images in one request exceed the limit of {limits.max_images}")
    if keys is not None and len(keys) != len(parts):
        raise RequestError(400, f"key: one per image, got {len(keys)} keys for {len(parts)} images")
    items = [Item(name=name, seed=seed, key=None if keys is None else keys[i], top_k=top_k)
             for i, (name, _) in enumerate(parts)]
    pixels = 0
    for item, (name, data) in zip(items, parts):  # headers only: nothing is decoded before the budgets pass
        try:
            w, h = image_size(data, name, limits)
            pixels += w * h
        except RequestError as err:
            item.error, item.error_kind = str(err), "decode" if err.status == 400 else "too_large"
            if len(parts) == 1:
                raise
    if pixels > limits.max_request_pixels:
        raise RequestError(413, f"{len(parts)} images of {pixels} pixels in all exceed the per-request limit of "
                                f"{limits.max_request_pixels}; send fewer or smaller images per request")
    for item, (name, data) in zip(items, parts):
        if item.error is None:
            if deadline is not None and time.monotonic() > deadline:
                raise RequestError(503, "the request's deadline passed while its images were decoded; retry after "
                                        "the Retry-After delay, or send fewer images per request", "deadline")
            try:
                item.x = decode_image(data, preprocess, limits.max_pixels, name, limits.formats)
            except RequestError as err:
                item.error, item.error_kind = str(err), "decode" if err.status == 400 else "too_large"
                if len(parts) == 1:
                    raise
    if all(it.error for it in items):
        status = 413 if all(it.error_kind == "too_large" for it in items) else 400
        raise RequestError(status, ("no readable image: " + "; ".join(it.error for it in items))[:2000])
    return items

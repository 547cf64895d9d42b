"""HTTP request parsing for `scc serve`, plain functions tested without Ray: body + query -> `Item`s.

    items = parse_request(content_type, body, query, size=32, max_pixels=..., max_body_bytes=...)

One `Item` per image; a part that cannot be decoded is an Item with its error (the others still run), a request
with nothing readable a `RequestError` (4xx with a one-line reason).
"""
import io
import re
import time
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import torch

from ..errors import SccError

IMAGE_FIELD = "image"


class RequestError(SccError):
    """A request the service refuses: `status` (4xx/5xx) and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Item:
    """One image of a request, on its way to a batch."""
    name: str  # "body" or the multipart part's filename / "image[i]"
    x: torch.Tensor | None = None  # (3, S, S) in [0,1]
    seed: int | None = None  # the request's seed (None: the service's)
    key: Hashable | None = None  # the request's key (None: a fresh uuid)
    top_k: int | None = None
    error: str | None = None
    error_kind: str | None = None
    enqueued: float = field(default_factory=time.perf_counter)


# ----------------------------------------------------------------------------------------------------------
# Request parsing (plain functions)
# ----------------------------------------------------------------------------------------------------------
def set_pixel_limit(max_pixels: int) -> None:
    """PIL's decompression-bomb limit, set explicitly: Image.open warns above it and raises above twice it; we
    refuse anything above it before decoding (decode_image)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = int(max_pixels)


def decode_image(data: bytes, size: int, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) in [0,1] (scc.data's preprocessing); RequestError when unusable."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from ..data import pil_to_tensor, resize_center_crop

    if not data:
        raise RequestError(400, f"{name}: empty image")
    set_pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size  # from the header: nothing decoded yet
                if w * h > max_pixels:
                    raise RequestError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
                if w < 1 or h < 1:
                    raise RequestError(400, f"{name}: empty image ({w}x{h})")
                img.load()
                x = pil_to_tensor(img)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(413, f"{name}: image exceeds the limit of {max_pixels} pixels (PIL: {err})") from err
    except UnidentifiedImageError as err:
        raise RequestError(400, f"{name}: not a readable image (unknown or corrupt image format)") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(400, f"{name}: not a readable image ({type(err).__name__}: {err})") from err
    return resize_center_crop(x[None], size)[0]


def parse_key(text: str) -> Hashable:
    """A key from a query string: decimal integers are ints (like a dataset index), anything else a string."""
    text = text.strip()
    if not text or len(text) > 200:
        raise RequestError(400, f"key must be 1-200 characters, got {len(text)}")
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
    try:
        value = int(value)
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {value!r}") from None
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must lie in {shown}, got {value}")
    return value


def parse_query(query: Mapping[str, Sequence[str]], max_top_k: int,
                client_seeds: bool = True) -> tuple[int | None, list | None, int | None]:
    """(seed, keys or None, top_k) from the query parameters (each name -> its list of values). A `seed` is
    refused (403) unless the server lets clients choose seeds: whoever picks the seed knows every draw."""
    if query.get("seed") and not client_seeds:
        raise RequestError(403, "this server keeps its draws secret and refuses client-chosen seeds (a known seed "
                                "is a known-draws attack); drop ?seed=, or start it with --client-seeds for "
                                "reproducible answers")
    seed = _int_query(query, "seed", 0, 2 ** 63 - 1, "[0, 2**63)")
    keys = None
    if query.get("key"):
        keys = [parse_key(k) for v in query["key"] for k in v.split(",")]
    top_k = _int_query(query, "top_k", 1, max_top_k, f"1..{max_top_k}")
    return seed, keys, top_k


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """multipart/form-data -> [(field name, filename, bytes)] with the standard library's MIME parser."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if "boundary=" not in content_type:
        raise RequestError(400, "multipart body without a boundary in its Content-Type")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError(400, "malformed multipart body")
    parts = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        parts.append((name or "", part.get_filename(), payload if isinstance(payload, bytes) else b""))
    return parts


def parse_request(content_type: str | None, body: bytes, query: Mapping[str, Sequence[str]], size: int,
                  max_pixels: int, max_body_bytes: int, max_images: int = 64, max_top_k: int = 1000,
                  client_seeds: bool = True) -> list[Item]:
    """An HTTP request -> its Items (one per image, in order). RequestError (4xx) when the request as a whole is
    unusable: too large, no body, an unsupported type, bad query, or not one readable image."""
    if len(body) > max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    if not body:
        raise RequestError(400, "empty body: send one image (Content-Type image/*) or a multipart form with "
                                f"'{IMAGE_FIELD}' parts")
    seed, keys, top_k = parse_query(query, max_top_k, client_seeds)
    ctype = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parts = [(filename or f"{IMAGE_FIELD}[{i}]", data)
                 for i, (name, filename, data) in enumerate(p for p in parse_multipart(content_type, body)
                                                            if p[0] == IMAGE_FIELD)]
        if not parts:
            raise RequestError(400, f"multipart body has no '{IMAGE_FIELD}' part")
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        parts = [("body", body)]
    else:
        raise RequestError(415, f"unsupported Content-Type {ctype!r}: send image/*, application/octet-stream or "
                                "multipart/form-data")
    if len(parts) > max_images:
        raise RequestError(413, f"{len(parts)} images in one request exceed the limit of {max_images}")
    if keys is not None and len(keys) != len(parts):
        raise RequestError(400, f"key: one per image, got {len(keys)} keys for {len(parts)} images")
    items = []
    for i, (name, data) in enumerate(parts):
        item = Item(name=name, seed=seed, key=None if keys is None else keys[i], top_k=top_k)
        try:
            item.x = decode_image(data, size, max_pixels, name)
        except RequestError as err:
            item.error, item.error_kind = str(err), "decode" if err.status == 400 else "too_large"
            if len(parts) == 1:
                raise
        items.append(item)
    if all(it.error for it in items):
        raise RequestError(400, "no readable image: " + "; ".join(it.error for it in items))
    return items

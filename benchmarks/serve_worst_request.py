"""The worst requests we could construct against `scc serve`: bytes sent vs CPU seconds they cost.

    python benchmarks/serve_worst_request.py --json benchmarks/results/serve-worst-request.json

Part 1, in process (`scc.serve.requests.parse_request`, where a request's work before the model happens: split,
headers, budgets, decode, resize), with the default budgets of a 32-pixel model (the bundled one) and of a 224-pixel
one (ViT-B/32's rule): CPU seconds (thread time, best of 3) per crafted request, and the largest single allocation
torch made for it (the profiler's memory events) against the stated bound `largest_tensor_bytes`. Part 2, against a
real service (bundled model, eager SCC, 1 replica): each crafted request sent while a client keeps sending one good
image at a time; the ingress process's CPU seconds (/proc utime+stime) for it, its status, and the good client's
worst latency during it against its median alone. The crafted requests: PNG headers claiming huge sizes, the largest
image the per-image budget admits (zeros compress ~1000:1, so it is cheap to send), as many of them as the
per-request budget admits, in PNG and progressive JPEG, an animated GIF and an RLE BMP (off the default format
list), thin shapes within the pixel budget (1xN, Nx1, 2xN, at the 16:1 aspect limit, and many of them in one
request), a part whose header block is 1 MiB, the most multipart parts allowed and many more, and the largest body
of random bytes.
"""
import argparse
import io
import json
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from scc.images import Preprocess
from scc.models import preprocessing_of
from scc.serve.client import Client, multipart
from scc.serve.process import ServerProcess
from scc.serve.requests import Limits, RequestError, largest_tensor_bytes, parse_request


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image(side: int, fmt: str, noise: bool = False, frames: int = 1, height: int | None = None) -> bytes:
    """A side x side image (side x height when given) of zeros or noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (height or side, side, 3)
    arr = (rng.random(shape) * 255).astype(np.uint8) if noise else np.zeros(shape, np.uint8)
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", progressive=True, quality=95)
    elif fmt == "GIF":
        img.save(buf, format="GIF", save_all=True, append_images=[img] * (frames - 1))
    elif fmt == "BMP":
        img.convert("P").save(buf, format="BMP", compression="bmp_rle")
    else:
        img.save(buf, format=fmt, compress_level=9) if fmt == "PNG" else img.save(buf, format=fmt)
    return buf.getvalue()


def crafted(limits: Limits) -> dict[str, tuple[str, bytes]]:
    side = int(limits.max_pixels ** 0.5)
    per_request = max(1, limits.max_request_pixels // (side * side))
    big_png, big_jpeg = image(side, "PNG"), image(side, "JPEG", noise=True)
    return {
        "10 PNG headers claiming 6000x6000": multipart([("image", f"{i}.png", png_header(6000, 6000))
                                                        for i in range(10)]),
        "1 PNG header claiming 100000x100000": ("image/png", png_header(100_000, 100_000)),
        f"largest PNG admitted ({side}x{side}, zeros)": ("image/png", big_png),
        f"{per_request} of them (the per-request budget)": multipart([("image", f"{i}.png", big_png)
                                                                     for i in range(per_request)]),
        f"{per_request + 1} of them (over the per-request budget)": multipart(
            [("image", f"{i}.png", big_png) for i in range(per_request + 1)]),
        f"progressive JPEG {side}x{side} (noise)": ("image/jpeg", big_jpeg),
        f"animated GIF {side}x{side}, 50 frames (off the default list)": ("image/gif",
                                                                         image(side, "GIF", frames=50)),
        f"RLE BMP {side}x{side} (off the default list)": ("image/bmp", image(side, "BMP")),
        f"thin PNG {limits.max_pixels}x1 (within the pixel budget)": ("image/png", image(limits.max_pixels, "PNG",
                                                                                      height=1)),
        f"thin PNG 1x{limits.max_pixels}": ("image/png", image(1, "PNG", height=limits.max_pixels)),
        f"thin PNG {limits.max_pixels // 2}x2": ("image/png", image(limits.max_pixels // 2, "PNG", height=2)),
        f"PNG {4 * side}x{side // 4} (the 16:1 aspect limit, zeros)": ("image/png", image(4 * side, "PNG",
                                                                                          height=side // 4)),
        f"{limits.max_images} PNGs 16x1 (thin, within every limit)": multipart(
            [("image", f"{i}.png", image(16, "PNG", noise=True, height=1)) for i in range(limits.max_images)]),
        f"{per_request} thin PNGs {limits.max_pixels}x1": multipart(
            [("image", f"{i}.png", image(limits.max_pixels, "PNG", height=1)) for i in range(per_request)]),
        "a part with a 1 MiB header block": ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: "
                                             b'form-data; name="image"\r\nX: ' + b"x" * 2 ** 20 + b"\r\n\r\n" +
                                             big_png + b"\r\n--b--\r\n"),
        f"{limits.max_images + 8} empty parts (the most allowed)": multipart(
            [("image", f"{i}", b"") for i in range(limits.max_images + 8)]),
        "100000 empty parts": multipart([("image", f"{i}", b"") for i in range(100_000)]),
        "largest body of random bytes": ("image/png", os.urandom(limits.max_body_bytes)),
    }


def largest_allocation(run) -> int:
    """The largest single CPU allocation torch makes while run() runs (allocations inside kernels included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0] or [0])


def in_process(preprocess: Preprocess) -> dict:
    limits = Limits.for_model(preprocess.size)
    bound = largest_tensor_bytes(preprocess, limits)
    rows = []
    for name, (ctype, body) in crafted(limits).items():
        best, status = None, 200

        def parse():
            try:
                parse_request(ctype, body, {}, preprocess, limits, replay=False)
                return 200
            except RequestError as err:
                return err.status

        for _ in range(3):
            start = time.thread_time()
            status = parse()
            spent = time.thread_time() - start
            best = spent if best is None else min(best, spent)
        peak = largest_allocation(parse)
        rows.append({"request": name, "bytes": len(body), "status": status, "cpu_s": round(best, 4),
                     "cpu_us_per_byte": round(best / len(body) * 1e6, 3), "largest_alloc_mb": round(peak / 2 ** 20, 3),
                     "within_bound": peak <= bound})
        print(preprocess.size, rows[-1], flush=True)
    return {"model_input": preprocess.size, "preprocess": preprocess.to_dict(),
            "limits": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(limits).items()},
            "largest_tensor_bound_mb": round(bound / 2 ** 20, 3), "requests": rows}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def against_service() -> dict:
    server = ServerProcess(["--defense", "scc", "--backend", "eager", "--replicas", "1", "--max-body-mb", "16"],
                           Path(tempfile.mkdtemp(prefix="scc-worst-")) / "serve.log")
    server.start()
    try:
        ingress = next(p for p in server.processes() if "ServeReplica:scc:scc" in
                       Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                       and "scc-model" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"))
        good = image(32, "PNG", noise=True)
        c = Client(server.url, timeout=120)
        alone = []
        for _ in range(20):
            t = time.perf_counter()
            c.request("POST", "/v1/classify", good, {"Content-Type": "image/png"})
            alone.append(time.perf_counter() - t)
        rows = []
        for name, (ctype, body) in crafted(Limits.for_model(32)).items():
            stop, lat = threading.Event(), []

            def probe():
                pc = Client(server.url, timeout=120)
                while not stop.is_set():
                    t = time.perf_counter()
                    pc.request("POST", "/v1/classify", good, {"Content-Type": "image/png"})
                    lat.append(time.perf_counter() - t)
                pc.close()

            th = threading.Thread(target=probe, daemon=True)
            th.start()
            time.sleep(0.3)
            before = cpu_seconds(ingress)
            t = time.perf_counter()
            status, raw = c.request("POST", "/v1/classify", body, {"Content-Type": ctype})
            wall = time.perf_counter() - t
            spent = cpu_seconds(ingress) - before
            time.sleep(0.3)
            stop.set()
            th.join(30)
            rows.append({"request": name, "bytes": len(body), "status": status, "wall_s": round(wall, 3),
                         "ingress_cpu_s": round(spent, 3),
                         "good_client_worst_ms": round(max(lat) * 1e3, 1) if lat else None,
                         "answer": raw[:160].decode(errors="replace")})
            print(rows[-1], flush=True)
        c.close()
        return {"good_request_alone_median_ms": round(sorted(alone)[len(alone) // 2] * 1e3, 1), "requests": rows}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from scc.provenance import hardware, versions

    import torch

    torch.set_num_threads(1)
    report = {"command": "python " + " ".join(sys.argv), "threads": 1, "load_average_before": os.getloadavg(),
              "in_process": [in_process(preprocessing_of("scc-tiny-digits")), in_process(Preprocess(224))],
              "service": against_service(),
              "load_average_after": os.getloadavg(), "hardware": hardware("cpu"), "versions": versions()}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

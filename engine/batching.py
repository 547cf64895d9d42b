"""Chunking and padding, written once for every backend that runs fixed batch sizes (compiled buckets, fixed-batch
ONNX files, the server).

    for lo, n, rows in padded_chunks([x, *draws], 8, bucket): ...   # fixed-size chunks, the last one padded
    buckets = power_of_two_buckets(8)                              # [1, 2, 4, 8]

Padding repeats a chunk's last row (its image and its draws), so padded rows compute what a real row would
(never NaN) and are sliced off; every image is defended independently, so padding never changes other rows.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .errors import SccError

def pad_rows(tensors: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """Pad every tensor (same leading size n <= rows) to `rows` rows by repeating its last row."""
    n = tensors[0].shape[0]
    if n == rows:
        return list(tensors)
    return [torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])]) for t in tensors]


def padded_chunks(tensors: Sequence[torch.Tensor], size: int,
                  bucket=None) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """(start, real rows n, tensors padded to bucket(n) rows) over chunks of at most `size` rows.

    `bucket(n)` gives the padded size of a chunk of n rows (default: `size`, a fixed-batch graph); pass
    `lambda n: n` for no padding. Slice results back with `[:n]`.
    """
    if size < 1:
        raise SccError(f"chunk size must be a positive integer, got {size!r}")
    total = tensors[0].shape[0]
    for lo in range(0, total, size):
        part = [t[lo: lo + size] for t in tensors]
        n = part[0].shape[0]
        yield lo, n, pad_rows(part, size if bucket is None else bucket(n))


def power_of_two_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself): the batch sizes a static-shape engine compiles."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise SccError(f"max_batch must be a positive integer, got {max_batch!r}")
    return sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})

"""scc.batching: chunk/pad and the power-of-two buckets of every fixed-batch backend."""
import pytest
import torch

from scc.batching import pad_rows, padded_chunks, power_of_two_buckets
from scc.errors import SccError


def test_padded_chunks_cover_every_row_once():
    x, d = torch.arange(11.0), torch.arange(11.0) * 10
    seen = []
    for lo, n, (xs, ds) in padded_chunks([x, d], 4):
        assert xs.shape[0] == ds.shape[0] == 4  # a fixed-batch graph: every chunk padded to 4
        assert torch.equal(xs[n:], xs[n - 1].expand(4 - n))  # padding repeats the last real row
        seen += xs[:n].tolist()
        assert torch.equal(ds[:n], d[lo: lo + n])
    assert seen == x.tolist()
    sizes = [rows[0].shape[0] for _, _, rows in padded_chunks([x], 8, lambda n: 1 << (n - 1).bit_length())]
    assert sizes == [8, 4]  # 8 real rows, then 3 rows in a bucket of 4
    assert [r.shape[0] for r in pad_rows([torch.zeros(3, 2)], 5)] == [5]
    with pytest.raises(SccError, match="chunk size must be a positive integer, got 0"):
        next(padded_chunks([x], 0))


def test_buckets():
    assert power_of_two_buckets(1) == [1]
    assert power_of_two_buckets(8) == [1, 2, 4, 8]
    assert power_of_two_buckets(6) == [1, 2, 4, 6]
    with pytest.raises(SccError, match="max_batch must be a positive integer, got 0"):
        power_of_two_buckets(0)

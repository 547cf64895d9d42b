"""scc.bench.roofline: FLOPs split by the dtype that runs them, and a row's peak mixed from the dtypes' peaks."""
import pytest
import torch

import scc
from scc.bench.roofline import count_flops, flops_by_dtype, mixed_peak, roofline


@pytest.mark.parametrize("label", ["ttc", "scc-latency", "rtpt"])
def test_a_reduced_precision_row_counts_the_same_flops_and_says_who_runs_them(tiny, digits, label):
    x = digits[0][:2]
    defended = scc.defend(tiny, label, seed=0)
    draws = defended.draws(x)
    full = flops_by_dtype(defended, x, draws)
    assert set(full) == {"fp32"} and full["fp32"] == count_flops(defended, x, draws) > 0
    split = flops_by_dtype(defended.with_dtype(torch.bfloat16), x, draws)
    assert set(split) == {"fp32", "bf16"}, split
    # the procedure is the same, so is its count: only who runs it changes
    assert sum(split.values()) == full["fp32"], (split, full)
    share = split["fp32"] / full["fp32"]
    if label == "rtpt":  # the text tower it tunes stays fp32: a large share
        assert share > 0.2, split
    else:  # the image tower runs bf16; what stays fp32 (the patch stem, losses, logits) is small
        assert 0 < share < 0.2, split


def test_mixed_peak_is_the_time_each_dtype_would_take_at_its_own_peak():
    peaks = {"fp32": 100.0, "bf16": 300.0}
    assert mixed_peak({"fp32": 1e9}, peaks) == pytest.approx(100.0)
    assert mixed_peak({"bf16": 1e9}, peaks) == pytest.approx(300.0)
    # 1 GFLOP at 100 GFLOP/s + 3 GFLOP at 300 GFLOP/s = 0.02 s for 4 GFLOP: 200 GFLOP/s, not 300
    assert mixed_peak({"fp32": 1e9, "bf16": 3e9}, peaks) == pytest.approx(200.0)
    assert mixed_peak({"fp32": 1e9, "bf16": 3e9}, {"bf16": 300.0}) is None  # a dtype without a peak: unknown
    assert mixed_peak({"fp32": 0, "bf16": 3e9}, {"bf16": 300.0}) == pytest.approx(300.0)


def test_roofline_columns():
    row = roofline({"fp32": 1e9, "bf16": 3e9}, 0.04, {"fp32": 100.0, "bf16": 300.0})
    assert row["gflop_per_image"] == pytest.approx(4.0)
    assert row["gflop_per_image_by_dtype"] == pytest.approx({"fp32": 1.0, "bf16": 3.0})
    assert row["gflop_per_s"] == pytest.approx(100.0) and row["peak_gflop_per_s"] == pytest.approx(200.0)
    assert row["peak_fraction"] == pytest.approx(0.5)
    assert roofline({"bf16": 1e9}, 0.01, {})["peak_fraction"] is None


def test_the_bench_gives_a_bf16_row_the_peak_of_its_own_flop_mix(tiny, digits):
    from scc.bench.latency import benchmark

    rows, _, limits = benchmark(tiny, digits[0][:2], ["ttc"], ["eager"], [torch.float32, torch.bfloat16],
                                batch_size=1, official=False)
    peaks = limits["matmul_peak_gflops"]
    assert set(peaks) == {"fp32", "bf16"}
    by = {r["dtype"]: r for r in rows}
    fp32, bf16 = by["fp32"], by["bf16"]
    assert fp32["gflop_per_image_by_dtype"].keys() == {"fp32"}
    assert fp32["peak_gflop_per_s"] == pytest.approx(peaks["fp32"])
    split = bf16["gflop_per_image_by_dtype"]
    assert split.keys() == {"fp32", "bf16"}
    assert sum(split.values()) == pytest.approx(fp32["gflop_per_image"])  # same procedure, same count
    mix = mixed_peak({d: g * 1e9 for d, g in split.items()}, peaks)
    assert bf16["peak_gflop_per_s"] == pytest.approx(mix)
    assert min(peaks.values()) < bf16["peak_gflop_per_s"] < max(peaks.values())
    assert bf16["peak_fraction"] == pytest.approx(bf16["gflop_per_s"] / mix)

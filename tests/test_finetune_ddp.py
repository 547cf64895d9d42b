"""`scc finetune` under `torchrun --nproc-per-node 2` (DistributedDataParallel, gloo on CPU) against one process
with the same global batch: the same weights.

Tolerance 1e-6 (absolute, on weights of magnitude up to ~2.6): both runs see the same images, the same attack starts
and the same schedule; they differ only in how sums are ordered (a batch of 64 against two of 32 whose gradients
gloo averages), which moves fp32 results by a few ulps per step (measured: 1.5e-8 after 4 steps of PMG-AFT). A
wrong split (each process a different permutation, the sum-reduced KL not rescaled by the number of processes, the
batch not divided) moves them by orders of magnitude more; the test checks that a one-process run with the
per-process batch, 32, lands far outside the tolerance.
"""
import os
import subprocess
import sys

from safetensors.torch import load_file

ARGS = ["finetune", "--method", "pmg-aft", "--data", "digits", "--images", "256", "--epochs", "1", "--quiet"]
TOLERANCE = 1e-6


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("visual."))


def test_two_processes_give_the_weights_of_one(tmp_path):
    """PMG-AFT (its official KL is a sum over the batch: the term DDP's averaging would shrink) for 4 steps of
    global batch 64 on 256 training digits."""
    one, two, half = tmp_path / "one", tmp_path / "two", tmp_path / "half"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scc.cli",
          *ARGS, "--batch-size", "64", "--out", str(two)], tmp_path)
    _run([sys.executable, "-m", "scc.cli", *ARGS, "--batch-size", "64", "--out", str(one)], tmp_path)
    _run([sys.executable, "-m", "scc.cli", *ARGS, "--batch-size", "32", "--out", str(half)], tmp_path)
    name = "scc-tiny-digits-pmg-aft.safetensors"
    a, b, c = (load_file(str(d / name)) for d in (one, two, half))
    assert _max_diff(a, b) <= TOLERANCE
    assert _max_diff(a, c) > 100 * TOLERANCE  # the test can tell a different batch apart
    base = load_file(str(one / name))
    assert any(not k.startswith("visual.") for k in base)  # a whole open_clip state dict (text tower kept)

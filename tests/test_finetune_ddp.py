"""`scc finetune` under `torchrun --nproc-per-node 2` (DistributedDataParallel, gloo on CPU) against one process
with the same global batch: the same weights.

Tolerance 1e-6 (absolute, on weights of magnitude up to ~2.6): both runs see the same images, the same attack starts
and the same schedule; they differ only in how sums are ordered (a batch of 64 against two of 32 whose gradients
gloo averages), which moves fp32 results by a few ulps per step (measured: 1.5e-8 after 4 steps of PMG-AFT).

The controls run the same two-process command with one distributed bug planted in the workers (a monkeypatch in a
launcher script the test writes; the package has no such switch): the sum-reduced KL not rescaled by the number of
processes, or each process drawing its own batch order. Each must land far outside the tolerance (measured: 5.4e-4
and 1.1e-3), so the equivalence check can fail.
"""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ARGS = ["finetune", "--method", "pmg-aft", "--data", "digits", "--images", "256", "--epochs", "1", "--batch-size",
        "64", "--quiet"]
NAME = "scc-tiny-digits-pmg-aft.safetensors"
TOLERANCE = 1e-6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# A launcher for the controls: plants one bug in scc.train.finetune in each worker, then runs the command line.
PLANTED = '''
import os
import sys

from scc.train import finetune as ft

bug = sys.argv[1]
if bug == "kl-not-rescaled":  # training_loss told it runs alone: PMG-AFT's summed KL not multiplied by 2
    loss = ft.training_loss
    ft.training_loss = lambda towers, cfg, x, y, start, world=1: loss(towers, cfg, x, y, start, 1)
elif bug == "own-permutation":  # each process shuffles the epoch with its own seed
    derive = ft.derive_seed
    rank = int(os.environ["RANK"])
    ft.derive_seed = lambda seed, what: derive(seed + rank if what.startswith("epoch:") else seed, what)
else:
    raise SystemExit(f"unknown bug {bug}")
from scc.cli import main

sys.exit(main(sys.argv[2:]))
'''


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("visual."))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The weights of the one-process run (global batch 64, 4 steps of PMG-AFT on 256 training digits)."""
    out = tmp_path_factory.mktemp("one")
    _run([sys.executable, "-m", "scc.cli", *ARGS, "--out", str(out)], out)
    return load_file(str(out / NAME))


def test_two_processes_give_the_weights_of_one(tmp_path, one_process):
    """PMG-AFT (its official KL is a sum over the batch: the term DDP's averaging would shrink) for 4 steps of
    global batch 64 on 256 training digits."""
    _run([*TORCHRUN, "-m", "scc.cli", *ARGS, "--out", str(tmp_path / "two")], tmp_path)
    two = load_file(str(tmp_path / "two" / NAME))
    assert _max_diff(one_process, two) <= TOLERANCE
    assert any(not k.startswith("visual.") for k in two)  # a whole open_clip state dict (text tower kept)


@pytest.mark.parametrize("bug", ["kl-not-rescaled", "own-permutation"])
def test_a_planted_distributed_bug_breaks_the_equivalence(tmp_path, one_process, bug):
    """The same two-process run with one bug planted lands at least 100x the tolerance away from one process."""
    launcher = tmp_path / "planted.py"
    launcher.write_text(PLANTED)
    _run([*TORCHRUN, str(launcher), bug, *ARGS, "--out", str(tmp_path / "two")], tmp_path)
    assert _max_diff(one_process, load_file(str(tmp_path / "two" / NAME))) > 100 * TOLERANCE

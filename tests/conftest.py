import pytest
import torch

import scc
from scc.data import load_dataset


@pytest.fixture(scope="session")
def tiny():
    """The bundled scc-tiny-digits zero-shot classifier (CPU, frozen)."""
    return scc.load("scc-tiny-digits")


@pytest.fixture(scope="session")
def digits():
    """The 450 held-out digits (never used for training): (images (N,3,32,32) in [0,1], targets)."""
    ds = load_dataset("digits", 32)
    return ds.images, ds.targets


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield

"""Eager PyTorch: the reference path (every other backend's top-1 agreement is measured against it)."""


def test_eager(measure):
    measure("eager")

"""scc.metrics.top1_agreement: logits or labels on either side, NaN rows, mismatched shapes."""
import math
import re

import pytest
import torch

from scc.errors import SccError
from scc.metrics import top1_agreement


def test_logits_and_labels_on_either_side():
    a = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    b = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0], [9.0, 0.0, 0.0]], dtype=torch.bfloat16)
    assert top1_agreement(a, b) == 0.5 and top1_agreement(b, a) == 0.5
    labels = torch.tensor([1, 0, 2, 1])
    assert top1_agreement(a, labels) == 1.0 and top1_agreement(labels, b) == 0.5
    assert top1_agreement(labels, labels.int()) == 1.0
    assert top1_agreement(a[None], a[None]) == 1.0  # any leading shape: (1, 4, 3)


def test_a_nan_row_agrees_with_nothing():
    a = torch.tensor([[float("nan"), 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert top1_agreement(a, a) == 2 / 3  # the exact fraction, as a Python float
    assert top1_agreement(a, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)  # argmax would call the NaN row 0
    assert math.isnan(top1_agreement(torch.zeros(0, 3), torch.zeros(0, 3)))


def test_mismatched_shapes_are_named():
    for a, b in ((torch.zeros(4, 3), torch.zeros(5, 3)), (torch.zeros(4, 3), torch.zeros(4, 2)),
                 (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)),
                 (torch.zeros(4, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long))):
        with pytest.raises(SccError, match=re.escape(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")):
            top1_agreement(a, b)

"""The attention policy: which SDPA backend a defense runs under, decided here for every backend.

    with attention("compile", device): ...     # eager | differentiable | compile | trace
"""
from __future__ import annotations

import contextlib

import torch

ATTENTION_PURPOSES = ("eager", "differentiable", "compile", "trace")


def attention(purpose: str, device: torch.device | str = "cpu"):
    """The SDPA backend a defense runs under, decided here for every backend (a context manager).

    - "eager": PyTorch's own choice (the reference numbers of the eager module).
    - "differentiable": an attack differentiates through the defense's own gradient steps; only the math
      decomposition has a double backward.
    - "trace": make_fx records forward and backward ops for ONNX: the math decomposition (plain matmul +
      softmax, no fused kernel without a backward).
    - "compile": on CPU the math decomposition, which Inductor fuses (flash attention over the few tokens of a
      CLIP image costs more than the attention itself); on CUDA PyTorch's own choice (flash / efficient).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if purpose not in ATTENTION_PURPOSES:
        raise ValueError(f"unknown attention purpose {purpose!r}; choose from {ATTENTION_PURPOSES}")
    if purpose in ("differentiable", "trace") or (purpose == "compile" and torch.device(device).type == "cpu"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()

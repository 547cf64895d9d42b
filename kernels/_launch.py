"""What every launcher in scc.kernels checks before it runs a Triton kernel instead of the torch reference.

A kernel runs on CUDA tensors, or on CPU tensors when triton was imported with `TRITON_INTERPRET=1` (its
interpreter: fp32 only). Triton reads that variable when a kernel is decorated, i.e. when its module
(`scc.kernels.view_augment`, `scc.kernels.sign_step`) is first imported, so set it before that import.
Everything else falls back to the reference, with the reason from `status()` / `reason()` here (each kernel module passes its kill switch and mode).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # triton ships with torch's Linux wheels; elsewhere every op uses its torch reference
    triton = tl = InterpretedFunction = None

AVAILABLE = triton is not None
MAX_ELEMENTS = 2**31 - 1  # kernels index with int32 offsets


def is_interpreted(kernel) -> bool:
    return InterpretedFunction is not None and isinstance(kernel, InterpretedFunction)


def switched_off(switch: str) -> bool:
    """The kill switch `switch` (an environment variable) is set to 0. Read when the op is called or traced:
    a compiled graph keeps the choice it was traced with."""
    return os.environ.get(switch, "1").strip() == "0"


def unsupported(switch: str, interpreted: bool, device: torch.device, dtypes, numel: int) -> str | None:
    """None when a kernel can take tensors on `device` with these dtypes, else why it cannot (for the fallback)."""
    if switched_off(switch):
        return f"{switch}=0"
    if not AVAILABLE:
        return "triton is not installed"
    if numel > MAX_ELEMENTS:
        return f"{numel} elements exceed the kernels' int32 indexing"
    if interpreted:
        if device.type != "cpu":
            return f"triton was imported with TRITON_INTERPRET=1, which runs kernels on CPU tensors, not {device}"
        bad = sorted({str(d) for d in dtypes if d != torch.float32})
        if bad:
            return f"the Triton interpreter runs fp32 only, got {bad}"
        return None
    if device.type != "cuda":
        return (f"{device.type} tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                "imported (fp32 only)")
    return None


def reason(switch: str, interpreted: bool, tensors, numel: int) -> str | None:
    """None when a kernel takes these tensors (same device, one dtype), else why its reference runs instead."""
    tensors = [t for t in tensors if t is not None]
    why = unsupported(switch, interpreted, tensors[0].device, [t.dtype for t in tensors], numel)
    if why is None and len({t.dtype for t in tensors}) > 1:
        return f"mixed dtypes {sorted({str(t.dtype) for t in tensors})}"
    return why


def status(switch: str, interpreted: bool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """'triton', 'triton (interpreter)' or 'reference (<why>)': the path a launcher takes on `device`."""
    why = unsupported(switch, interpreted, torch.device(device), [dtype], 0)
    return "triton" + (" (interpreter)" if interpreted else "") if why is None else f"reference ({why})"


def _unavailable_jit(fn=None, **_):
    return None if fn is not None else _unavailable_jit


# Kernel files decorate with `jit` and annotate with `constexpr`, so they import (and fall back) without triton.
jit = triton.jit if AVAILABLE else _unavailable_jit
constexpr = tl.constexpr if AVAILABLE else int


def row_block(width: int) -> int:
    """BLOCK_W for the one-program-per-image-row kernels: the row padded to a power of two."""
    return max(16, 1 << (width - 1).bit_length())

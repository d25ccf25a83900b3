"""Which implementation of a kernel runs, decided at every call.

Triton on CUDA tensors, plain torch everywhere else (the nf4 matmul: bitsandbytes unless forced,
see kernels/nf4.py); `NLA_KERNELS=torch|triton` forces one (read at each call, so a benchmark can
switch in one process). Forcing Triton on CPU tensors only works
under the interpreter (`TRITON_INTERPRET=1`), which is how CI checks parity without a GPU.
"""
from __future__ import annotations

import os

import torch


_HAS_TRITON: bool | None = None


def has_triton() -> bool:
    # a plain global, not functools.cache: a compiled decode step traces this (dynamo warns on caches)
    global _HAS_TRITON
    if _HAS_TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _HAS_TRITON = True
        except Exception:  # triton missing or broken: the torch path always works
            _HAS_TRITON = False
    return _HAS_TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def forced() -> str:
    """NLA_KERNELS: "torch", "triton" or "" (each kernel's own choice)."""
    f = os.environ.get("NLA_KERNELS", "").strip().lower()
    if f not in ("", "torch", "triton"):
        raise ValueError(f"NLA_KERNELS must be torch or triton, got {f!r}")
    return f


def backend(*tensors: torch.Tensor) -> str:
    f = forced()
    if f == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if f == "triton":
        if not has_triton():
            raise RuntimeError("NLA_KERNELS=triton but triton is not installed (pip install triton)")
        if not on_cuda and not interpreting():
            raise RuntimeError("NLA_KERNELS=triton needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
        return "triton"
    return "triton" if on_cuda and has_triton() else "torch"


_MMA_BF16: dict = {}


def dot_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Can a Triton kernel with tl.dot run in `dtype` on `device`? bf16 dots need sm_80 (Ampere)
    or newer: on a T4 or V100 the kernels that multiply (nf4, decode attention) leave bf16 to
    the torch path, which worked there before them."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return True
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _MMA_BF16:  # once per device: a decode step asks for every projection
        _MMA_BF16[i] = torch.cuda.get_device_capability(i)[0] >= 8
    return _MMA_BF16[i]


_SMS: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, asked once per device."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if os.environ.get("NLA_KERNELS_POISON") == "1":
        out.fill_(float("nan") if out.dtype.is_floating_point else -1)
    return out


def empty(shape, dtype, device) -> torch.Tensor:
    """Output buffers of the Triton paths. With NLA_KERNELS_POISON=1 they start as NaN (or -1),
    so a parity test sees any element a kernel forgot to write."""
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """empty() with x's layout where x is dense (torch.empty_like's rule)."""
    return _poisoned(torch.empty_like(x))


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())

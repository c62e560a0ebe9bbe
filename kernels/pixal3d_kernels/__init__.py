"""GPU kernels of the Pixal3D backend.

Every module holds a Triton kernel and the plain-PyTorch reference it must match; the public function of each
module dispatches with `use_triton(tensor)`: Triton on CUDA tensors when Triton is importable, the reference
otherwise (the CPU path of the backend *is* the reference, so there is one implementation of each computation
besides its kernel).

`PIXAL3D_KERNELS=torch` forces the references everywhere (for side-by-side benchmarks and bisecting);
`PIXAL3D_KERNELS=triton` forces the kernels, also on CPU tensors through Triton's interpreter
(`TRITON_INTERPRET=1` must then be set before Triton is imported: the tests do this).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a computation on `t` runs the Triton kernel (see the module docstring)."""
    mode = os.environ.get("PIXAL3D_KERNELS", "").strip().lower()
    if mode not in ("", "torch", "triton"):
        raise ValueError(f"PIXAL3D_KERNELS must be 'torch' or 'triton', got {mode!r}")
    if mode == "torch" or not triton_importable():
        if mode == "triton":
            raise RuntimeError("PIXAL3D_KERNELS=triton but Triton is not installed")
        return False
    if mode == "triton":
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError("PIXAL3D_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1")
        return True
    return t.device.type == "cuda"

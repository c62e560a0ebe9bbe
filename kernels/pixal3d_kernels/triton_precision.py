"""The tensor-core mode of fp32 `tl.dot` in the kernels, one rule for all of them."""
from __future__ import annotations

import torch


def fp32_input_precision() -> str:
    """TF32 only where torch's own fp32 matmuls may use it (`torch.backends.cuda.matmul.allow_tf32`), else 3xTF32,
    which is about as accurate as fp32 (the references' precision) at a third of TF32's speed."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def dot_input_precision(dtype: torch.dtype) -> str:
    """`input_precision` for a `tl.dot` on `dtype` operands (16-bit operands ignore it)."""
    return fp32_input_precision() if dtype == torch.float32 else "tf32"

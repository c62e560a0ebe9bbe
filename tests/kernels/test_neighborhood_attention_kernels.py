"""Triton cell attention (NAF's neighbourhood attention with per-cell keys and values) against the reference.

On CUDA the kernel runs compiled; without a GPU through Triton's interpreter (tiny sizes). Tolerances against the
float64 reference on the same rounded inputs (outputs are convex combinations of unit-scale values, atol = rtol):
fp32 1e-5 (3xTF32 on GPU), fp16 2e-3, bf16 2e-2 (the softmax weights are rounded to the value dtype, as in the
reference).
"""
import pytest
import torch
import torch.nn.functional as F
from pixal3d_kernels import neighborhood_attention as na

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


pytestmark = pytest.mark.usefixtures("triton_kernels")


def inputs(batch, cells, repeat, heads, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    (h, w), (rh, rw) = cells, repeat
    q = torch.randn(batch, h * rh, w * rw, heads, d, generator=g)
    k = torch.randn(batch, h, w, heads, d, generator=g)
    v = torch.randn(batch, h, w, heads, dv, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def reference(q, k, v, kernel, repeat, scale=None):
    return na.neighborhood_attention_2d_reference(q.double(), na.repeat_cells(k, repeat).double(),
                                                  na.repeat_cells(v, repeat).double(), kernel, repeat, scale)


@pytest.mark.parametrize("batch,cells,repeat,kernel,d,dv,dtype", [
    (1, (4, 5), (2, 3), (3, 5), 8, 12, torch.float32),     # rectangular cells and window; window = all of w
    (2, (5, 3), (4, 4), (3, 3), 16, 40, torch.float16),    # 16 pixels per cell; Dv not a multiple of the block
    (1, (3, 3), (1, 1), (3, 3), 4, 4, torch.float32),      # no repeat (dilation 1): plain 3x3 attention
    pytest.param(1, (4, 4), (2, 2), (3, 3), 32, 64, torch.bfloat16, marks=pytest.mark.skipif(
        not CUDA, reason="Triton 3.6's interpreter computes bf16 tl.dot on the raw bits")),
])
def test_cell_attention_matches_reference(batch, cells, repeat, kernel, d, dv, dtype):
    q, k, v = inputs(batch, cells, repeat, 2, d, dv, dtype)
    out = na.neighborhood_attention_2d(q, k, v, kernel, repeat, kv_repeat=repeat)
    assert out.dtype == dtype and out.shape == q.shape[:4] + (dv,)
    torch.testing.assert_close(out.double(), reference(q, k, v, kernel, repeat), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


def test_explicit_scale_and_single_head():
    q, k, v = inputs(1, (3, 4), (2, 2), 1, 8, 8, torch.float32, seed=1)
    out = na.neighborhood_attention_2d(q, k, v, 3, 2, scale=0.7, kv_repeat=2)
    torch.testing.assert_close(out.double(), reference(q, k, v, (3, 3), (2, 2), 0.7), atol=1e-5, rtol=1e-5)


def test_other_dilations_and_errors_fall_back_or_raise():
    q, k, v = inputs(1, (4, 4), (2, 2), 1, 4, 4, torch.float32, seed=2)
    # dilation 1 over 2x-repeated cells: windows do not align with cells, so the reference runs on the repeats
    out = na.neighborhood_attention_2d(q, k, v, 3, 1, kv_repeat=2)
    torch.testing.assert_close(out.double(), na.neighborhood_attention_2d_reference(
        q.double(), na.repeat_cells(k, (2, 2)).double(), na.repeat_cells(v, (2, 2)).double(), 3, 1), atol=1e-5,
        rtol=1e-5)
    with pytest.raises(ValueError, match="kv_repeat"):
        na.neighborhood_attention_2d(q, k[:, :3], v[:, :3], 3, 2, kv_repeat=2)
    with pytest.raises(ValueError, match="kernel_size"):
        na.neighborhood_attention_2d(q, k, v, 5, 2, kv_repeat=2)


def test_repeat_cells_is_nearest_exact_upsampling():
    x = torch.randn(2, 3, 4, 5)                                   # [B, C, h, w]
    up = F.interpolate(x, size=(16, 25), mode="nearest-exact")
    torch.testing.assert_close(na.repeat_cells(x.permute(0, 2, 3, 1), (4, 5)), up.permute(0, 2, 3, 1))

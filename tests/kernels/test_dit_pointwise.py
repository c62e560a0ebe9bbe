"""The fused pointwise kernels of the flow-transformer blocks against their references, on fresh random inputs laid
out as the blocks pass them (modulation vectors sliced out of one [G, 6C] tensor, q and k sliced out of a fused qkv
projection). On CPU through Triton's interpreter, on CUDA compiled. Tolerances as `pixal3d_kernels.dit_pointwise`
states them: fp32 within 2e-5, 16-bit dtypes within a unit in the last place of the operands (a few units large)."""
import math

import pytest
import torch

from pixal3d_kernels import dit_pointwise as dp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton 3.6's interpreter converts to bf16 by truncation, not rounding"))]

pytestmark = pytest.mark.usefixtures("triton_kernels")


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        return
    eps = torch.finfo(ref.dtype).eps     # one unit in the last place at 1 (the operands are up to a few units)
    torch.testing.assert_close(out, ref, atol=4 * eps, rtol=2 * eps)


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def modulation(groups, channels, seed, dtype):
    """shift, scale, gate as the blocks slice them out of the shared [G, 6C] modulation."""
    mod = randn(groups, 6 * channels, seed=seed, dtype=dtype, scale=0.5)
    return mod.chunk(6, dim=-1)[:3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,modulate", [(False, True), (True, False), (False, False)])
def test_modulated_layer_norm(dtype, affine, modulate):
    batch, tokens, channels = 2, 37, 48                      # channels not a power of two
    x = randn(batch, tokens, channels, seed=1, dtype=dtype, scale=3.0) + 0.5
    weight = randn(channels, seed=2) if affine else None
    bias = randn(channels, seed=3) if affine else None
    shift, scale, _ = modulation(batch, channels, 4, dtype) if modulate else (None, None, None)
    out = dp.modulated_layer_norm(x, weight, bias, shift, scale, rows_per_group=tokens)
    assert_matches(out, dp.modulated_layer_norm_reference(x, weight, bias, shift, scale, tokens, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_per_sample_and_per_token(dtype):
    rows, channels = 40, 300                                 # more than one channel block
    h, y = randn(rows, channels, seed=5, dtype=dtype), randn(rows, channels, seed=6, dtype=dtype)
    for groups in (1, 2, rows):                              # one sample, a CFG pair, unequal samples (per token)
        _, _, gate = modulation(groups, channels, 7 + groups, dtype)
        out = dp.gated_residual(h, gate, y, rows_per_group=rows // groups)
        assert_matches(out, dp.gated_residual_reference(h, gate, y, rows // groups))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,rope", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dense", [True, False])
def test_rms_norm_rope_on_fused_qkv_views(dtype, norm, rope, dense):
    heads, head_dim, tokens = 3, 12, 29
    lead = (2, tokens) if dense else (tokens,)               # dense [B, L, ...] or packed [N, ...]
    qkv = randn(*lead, 3 * heads * head_dim, seed=10, dtype=dtype, scale=2.0)
    q, k, _ = qkv.unflatten(-1, (3, heads, head_dim)).unbind(-3)
    assert not q.is_contiguous()
    gamma = (1 + randn(heads, head_dim, seed=11, scale=0.3)) if norm else None
    angles = randn(tokens, head_dim // 2, seed=12, scale=3.0).float()
    phases = torch.polar(torch.ones_like(angles), angles) if rope else None
    for x in (q, k):
        out = dp.rms_norm_rope(x, gamma, phases)
        assert out.is_contiguous()
        assert_matches(out, dp.rms_norm_rope_reference(x, gamma, phases))
    if norm and not rope:                                    # the RMS norm's meaning: unit RMS times gamma
        rms = dp.rms_norm_rope(q, torch.ones_like(gamma), None).float().pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-2, rtol=1e-2)


def test_rope_rotates_pairs_and_keeps_norms():
    x = randn(5, 2, 6, seed=13)
    phases = torch.polar(torch.ones(5, 3), torch.full((5, 3), math.pi / 2)).to(DEVICE)
    out = dp.rms_norm_rope(x, None, phases)
    torch.testing.assert_close(out[..., 0::2], -x[..., 1::2])       # (a + ib) * i = -b + ia
    torch.testing.assert_close(out[..., 1::2], x[..., 0::2])


def test_with_gradients_the_reference_runs():
    x = randn(4, 8, 16, seed=14).requires_grad_()
    out = dp.modulated_layer_norm(x, None, None, *modulation(4, 16, 15, torch.float32)[:2], rows_per_group=8)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_shape_errors_say_what_is_expected():
    x = randn(2, 10, 16, seed=16)
    shift, scale, gate = modulation(3, 16, 17, torch.float32)
    with pytest.raises(ValueError, match=r"scale must be \[G, 16\] with G x 10 = 20 rows"):
        dp.modulated_layer_norm(x, None, None, shift, scale, rows_per_group=10)
    with pytest.raises(ValueError, match="shift and scale come together"):
        dp.modulated_layer_norm(x, None, None, None, scale, rows_per_group=10)
    with pytest.raises(ValueError, match="gate must be"):
        dp.gated_residual(x, gate, x, rows_per_group=10)
    with pytest.raises(ValueError, match=r"phases must be \[10, 4\]"):
        dp.rms_norm_rope(x.unflatten(-1, (2, 8)), None, torch.ones(9, 4, dtype=torch.complex64, device=DEVICE))

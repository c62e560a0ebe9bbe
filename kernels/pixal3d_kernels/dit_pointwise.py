"""The pointwise work of a flow-transformer block (spec §4.1), fused: three kernels in place of ~50 launches.

Per block the official code runs, outside its matmuls and attention, chains of small element-wise ops over all
tokens: each LayerNorm casts to fp32 and back, the adaLN modulation `x * (1 + scale) + shift` and the gated
residual `h + gate * y` are separate launches, and each q/k head is RMS-normalised and rotated (RoPE) through
fp32 and complex temporaries. On the H200 these passes take as long as the attention at 1024 (BENCHMARKS.md,
profile). Here each chain is one kernel that reads its inputs once and writes its output once:

* `modulated_layer_norm(x, weight, bias, shift, scale, rows_per_group, eps)`: LayerNorm with fp32 statistics
  (official `LayerNorm32`: the result is rounded to x's dtype), optional affine weight/bias, then optional adaLN
  modulation `y * (1 + scale) + shift`, all in x's dtype like the official code.
* `gated_residual(h, gate, y, rows_per_group)`: `h + gate * y`.
* `rms_norm_rope(x, gamma, phases)`: per-head `normalize(x) * gamma * sqrt(d)` in fp32 rounded to x's dtype (official
  `MultiHeadRMSNorm`), then the 3-D RoPE rotation of consecutive channel pairs by unit complex `phases` in fp32.

Per-sample vectors (shift, scale, gate) are [G, C] rows, one per *group* of `rows_per_group` consecutive token rows
of x: a dense batch [B, L, C] is B groups of L rows, a packed batch of equal-length samples is B groups of N / B
rows, and a packed batch of unequal samples passes one vector per token (G = N, rows_per_group = 1). No [N, C]
copy of a per-sample vector is made.

The Triton kernels run in inference (no autograd graph); with gradients the references run. Tolerance of a kernel
against its reference: the kernels round to x's dtype where the reference does, so most elements agree to the last
bit; LayerNorm statistics and the normalising sum are reduced in another order and the GPU compiler may fuse a
multiply-add that the reference rounds in between, so for fp32 the results agree within 2e-5 on unit-scale inputs
and for 16-bit dtypes within a unit in the last place of the operands (atol 4 eps + rtol 2 eps of the dtype for
operands a few units large; measured on the H200 in the tests).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import triton_importable, use_triton


# ---------------------------------------------------------------------------------------------------------
# plain-PyTorch references (the CPU path of the backend and the official numerics)
# ---------------------------------------------------------------------------------------------------------

def _grouped(x: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """x [..., C] viewed as [G, rows_per_group, C]."""
    return x.reshape(-1, rows_per_group, x.shape[-1])


def modulated_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                   shift: torch.Tensor | None, scale: torch.Tensor | None, rows_per_group: int,
                                   eps: float) -> torch.Tensor:
    y = F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(x.dtype)
    if scale is None:
        return y
    y = _grouped(y, rows_per_group) * (1 + scale[:, None]) + shift[:, None]
    return y.view(x.shape)


def gated_residual_reference(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, rows_per_group: int
                             ) -> torch.Tensor:
    return (_grouped(h, rows_per_group) + gate[:, None] * _grouped(y, rows_per_group)).view(h.shape)


def rms_norm_rope_reference(x: torch.Tensor, gamma: torch.Tensor | None, phases: torch.Tensor | None
                            ) -> torch.Tensor:
    if gamma is not None:
        x = (F.normalize(x.float(), dim=-1) * gamma * math.sqrt(x.shape[-1])).to(x.dtype)
    if phases is not None:
        rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * phases.unsqueeze(-2)
        x = torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _round(v, dtype: tl.constexpr):
        """v (fp32) rounded to `dtype` and back: the reference's intermediate roundings."""
        return v.to(dtype).to(tl.float32)

    @triton.jit
    def _modulated_layer_norm_kernel(x_ptr, out_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr,
                                     rows, channels, rows_per_group, stride_vec, eps,
                                     AFFINE: tl.constexpr, MODULATE: tl.constexpr,
                                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program: BLOCK_R whole rows (BLOCK_C >= channels)."""
        dt: tl.constexpr = out_ptr.dtype.element_ty
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        c_live = c < channels
        tile = (r < rows)[:, None] & c_live[None, :]
        offsets = r[:, None] * channels + c[None, :]
        x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(tile, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(centred * centred, axis=1) / channels + eps)
        y = centred * rstd[:, None]
        if AFFINE:
            w = tl.load(w_ptr + c, mask=c_live, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=c_live, other=0.0).to(tl.float32)
            y = y * w[None, :] + b[None, :]
        y = _round(y, dt)
        if MODULATE:
            vec = (r // rows_per_group)[:, None] * stride_vec + c[None, :]
            scale = tl.load(scale_ptr + vec, mask=tile, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + vec, mask=tile, other=0.0).to(tl.float32)
            y = _round(y * _round(1.0 + scale, dt), dt) + shift
        tl.store(out_ptr + offsets, y.to(dt), mask=tile)

    @triton.jit
    def _gated_residual_kernel(h_ptr, gate_ptr, y_ptr, out_ptr, rows, channels, rows_per_group, stride_gate,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program: a BLOCK_R x BLOCK_C tile."""
        dt: tl.constexpr = out_ptr.dtype.element_ty
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        tile = (r < rows)[:, None] & (c < channels)[None, :]
        offsets = r[:, None] * channels + c[None, :]
        h = tl.load(h_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + (r // rows_per_group)[:, None] * stride_gate + c[None, :], mask=tile,
                       other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (h + _round(gate * y, dt)).to(dt), mask=tile)

    @triton.jit
    def _rms_norm_rope_kernel(x_ptr, out_ptr, gamma_ptr, phase_ptr, rows, tokens, heads, stride_row, stride_head,
                              norm_scale, D: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program: (BLOCK_R rows, one head); a row is one token of one sample, read and written whole; RoPE's
        channel pairs are split out of the row in registers."""
        dt: tl.constexpr = out_ptr.dtype.element_ty
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        head = tl.program_id(1)
        c = tl.arange(0, BLOCK_D)
        c_live = c < D
        tile = (r < rows)[:, None] & c_live[None, :]
        x = tl.load(x_ptr + r[:, None] * stride_row + head * stride_head + c[None, :], mask=tile,
                    other=0.0).to(tl.float32)
        if NORM:
            norm = tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), 1e-12)[:, None]
            g = tl.load(gamma_ptr + head * D + c, mask=c_live, other=0.0).to(tl.float32)[None, :]
            x = _round(tl.math.div_rn(x, norm) * g * norm_scale, dt)
        if ROPE:
            # phases as floats [T, D/2, 2]: (cos, sin) of each channel pair
            phase = tl.load(phase_ptr + (r % tokens)[:, None] * D + c[None, :], mask=tile, other=0.0)
            cos, sin = tl.split(tl.reshape(phase, (BLOCK_R, BLOCK_D // 2, 2)))
            even, odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))
            # (even + i odd)(cos + i sin)
            x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_R, BLOCK_D))
        tl.store(out_ptr + (r[:, None] * heads + head) * D + c[None, :], x.to(dt), mask=tile)


def _rows(x: torch.Tensor) -> tuple[int, int]:
    """(rows, channels) of x [..., C]."""
    channels = x.shape[-1]
    return (x.numel() // channels if channels else 0), channels


def _modulated_layer_norm_triton(x, weight, bias, shift, scale, rows_per_group, eps):
    x = x.contiguous()
    (rows, channels), out = _rows(x), torch.empty_like(x)
    if rows == 0:
        return out
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, min(16, 4096 // block_c))
    modulate = scale is not None
    if modulate and (shift.stride(-1) != 1 or scale.stride(-1) != 1 or shift.stride(0) != scale.stride(0)):
        shift, scale = shift.contiguous(), scale.contiguous()
    _modulated_layer_norm_kernel[(triton.cdiv(rows, block_r),)](
        x, out, weight, bias, shift if modulate else x, scale if modulate else x,
        rows, channels, rows_per_group, scale.stride(0) if modulate else 0, eps,
        AFFINE=weight is not None, MODULATE=modulate, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=8 if block_c >= 2048 else 4)
    return out


def _gated_residual_triton(h, gate, y, rows_per_group):
    h, y = h.contiguous(), y.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    (rows, channels), out = _rows(h), torch.empty_like(h)
    if rows == 0:
        return out
    block_c = min(256, triton.next_power_of_2(channels))
    block_r = 16
    _gated_residual_kernel[(triton.cdiv(rows, block_r), triton.cdiv(channels, block_c))](
        h, gate, y, out, rows, channels, rows_per_group, gate.stride(0), BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _rms_norm_rope_triton(x, gamma, phases):
    *lead, tokens, heads, d = x.shape
    rows = math.prod(lead) * tokens
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or heads == 0:
        return out
    flat = x.reshape(rows, heads, d)          # a view for q/k sliced out of a fused qkv projection
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    gamma_arg = gamma.contiguous() if gamma is not None else flat
    phase_arg = torch.view_as_real(phases.contiguous()) if phases is not None else flat
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 1024 // block_d))
    _rms_norm_rope_kernel[(triton.cdiv(rows, block_r), heads)](
        flat, out, gamma_arg, phase_arg, rows, tokens, heads, flat.stride(0), flat.stride(1), math.sqrt(d),
        D=d, NORM=gamma is not None, ROPE=phases is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------------------------
# public, dispatching
# ---------------------------------------------------------------------------------------------------------

def _kernel_runs(*tensors: torch.Tensor | None) -> bool:
    """Triton where `use_triton` says so and no gradient is wanted (the kernels have no backward)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return use_triton(tensors[0])


def _check_groups(x: torch.Tensor, vectors: torch.Tensor, rows_per_group: int, what: str) -> None:
    rows, channels = _rows(x)
    if vectors.dim() != 2 or vectors.shape[1] != channels or rows_per_group * vectors.shape[0] != rows:
        raise ValueError(f"{what} must be [G, {channels}] with G x {rows_per_group} = {rows} rows of x, "
                         f"got {tuple(vectors.shape)}")


def modulated_layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                         shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                         rows_per_group: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over x's last dim (fp32 statistics, result in x's dtype), optional affine `weight`/`bias` [C]
    (fp32), then optional `* (1 + scale) + shift` with per-group vectors [G, C] (module docstring)."""
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale come together")
    if scale is not None:
        _check_groups(x, scale, rows_per_group, "scale")
        _check_groups(x, shift, rows_per_group, "shift")
    if _kernel_runs(x, weight, bias, shift, scale):
        return _modulated_layer_norm_triton(x, weight, bias, shift, scale, rows_per_group, eps)
    return modulated_layer_norm_reference(x, weight, bias, shift, scale, rows_per_group, eps)


def gated_residual(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, rows_per_group: int = 1) -> torch.Tensor:
    """`h + gate * y` for h, y [..., C] and per-group gates [G, C] (module docstring)."""
    if h.shape != y.shape:
        raise ValueError(f"h {tuple(h.shape)} and y {tuple(y.shape)} differ")
    _check_groups(h, gate, rows_per_group, "gate")
    if _kernel_runs(h, gate, y):
        return _gated_residual_triton(h, gate, y, rows_per_group)
    return gated_residual_reference(h, gate, y, rows_per_group)


def rms_norm_rope(x: torch.Tensor, gamma: torch.Tensor | None, phases: torch.Tensor | None) -> torch.Tensor:
    """Per-head RMS norm (`gamma` [H, d], or None for none) then RoPE (`phases` complex [T, d/2], or None) of
    x [..., T, H, d] (any strides with unit channel stride are read in place). Returns a new [..., T, H, d]."""
    if x.dim() < 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., T, H, d] with even d, got {tuple(x.shape)}")
    if gamma is not None and tuple(gamma.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"gamma must be {tuple(x.shape[-2:])}, got {tuple(gamma.shape)}")
    if phases is not None and tuple(phases.shape) != (x.shape[-3], x.shape[-1] // 2):
        raise ValueError(f"phases must be [{x.shape[-3]}, {x.shape[-1] // 2}], got {tuple(phases.shape)}")
    if gamma is None and phases is None:
        return x
    if _kernel_runs(x, gamma):
        return _rms_norm_rope_triton(x, gamma, phases)
    return rms_norm_rope_reference(x, gamma, phases)

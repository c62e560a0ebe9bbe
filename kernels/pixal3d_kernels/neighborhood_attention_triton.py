"""Triton kernel of `neighborhood_attention`: NAF's attention over low-resolution cells.

Queries are full-resolution pixels; keys and values are given per low-res cell and stand for their nearest repeat
by (rh, rw), with the neighbourhood dilation equal to that repeat. Then the NATTEN window of pixel (y, x), taken in
its residue class, covers exactly the low-res cells [r0, r0 + kh) x [c0, c0 + kw) with
r0 = clamp(y // rh - kh // 2, 0, h - kh) (same for columns): one window per cell, shared by its rh * rw pixels.

One program takes BLOCK_Q pixels of one cell and one head: it gathers the cell's kh * kw window of keys and
values (padded to BLOCK_KV rows, masked), computes the [BLOCK_Q, BLOCK_KV] logits with one `tl.dot`, the softmax in
fp32, and the output BLOCK_DV channels at a time with a second `tl.dot`. Nothing is written but the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_precision import dot_input_precision

LOG2_E = 1.4426950408889634


@triton.jit
def _cell_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, h, w, heads, d, dv, rh, rw, scale_log2,
                           KH: tl.constexpr, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr):
    head = tl.program_id(0) % heads
    cell = tl.program_id(0) // heads
    cell_col = cell % w
    cell_row = (cell // w) % h
    batch = cell // (w * h)

    # this program's pixels of the cell, as rows of q / out viewed as [B*H*W*heads, channels]
    t = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    t_ok = t < rh * rw
    y = cell_row * rh + t // rw
    x = cell_col * rw + t % rw
    pixel = ((batch * h * rh + y).to(tl.int64) * (w * rw) + x) * heads + head

    # the cell's window, as rows of k / v viewed as [B*h*w*heads, channels]
    r0 = tl.minimum(tl.maximum(cell_row - KH // 2, 0), h - KH)
    c0 = tl.minimum(tl.maximum(cell_col - KW // 2, 0), w - KW)
    a = tl.arange(0, BLOCK_KV)
    a_ok = a < KH * KW
    neighbor = ((batch * h + r0 + a // KW).to(tl.int64) * w + c0 + a % KW) * heads + head

    ch = tl.arange(0, BLOCK_D)
    ch_ok = ch < d
    q = tl.load(q_ptr + pixel[:, None] * d + ch[None, :], mask=t_ok[:, None] & ch_ok[None, :], other=0.0)
    k = tl.load(k_ptr + neighbor[:, None] * d + ch[None, :], mask=a_ok[:, None] & ch_ok[None, :], other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2        # log2-scaled
    logits = tl.where(a_ok[None, :], logits, float("-inf"))
    p = tl.exp2(logits - tl.max(logits, axis=1)[:, None])
    p = (p / tl.sum(p, axis=1)[:, None]).to(v_ptr.dtype.element_ty)

    for c_start in range(0, dv, BLOCK_DV):
        cv = c_start + tl.arange(0, BLOCK_DV)
        cv_ok = cv < dv
        v = tl.load(v_ptr + neighbor[:, None] * dv + cv[None, :], mask=a_ok[:, None] & cv_ok[None, :], other=0.0)
        o = tl.dot(p, v, input_precision=INPUT_PRECISION)
        tl.store(out_ptr + pixel[:, None] * dv + cv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & cv_ok[None, :])


def _pow2_at_least_16(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def cell_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
                   scale: float | None = None) -> torch.Tensor:
    """q [B, H, W, heads, D]; k [B, h, w, heads, D], v [B, h, w, heads, Dv] with H = h*rh, W = w*rw ->
    [B, H, W, heads, Dv]: `neighborhood_attention_2d(q, k, v, kernel_size, (rh, rw), kv_repeat=(rh, rw))`."""
    (kh, kw) = kernel_size
    B, H, W, heads, d = q.shape
    h, w, dv = k.shape[1], k.shape[2], v.shape[-1]
    rh, rw = H // h, W // w
    if h < kh or w < kw:
        raise ValueError(f"neighbourhood attention needs length >= kernel_size * dilation, got "
                         f"{(H, W)} < {(kh, kw)} * {(rh, rw)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    out = v.new_empty(B, H, W, heads, dv)
    if out.numel() == 0:
        return out
    scale = d ** -0.5 if scale is None else scale
    block_q = 128 if rh * rw >= 128 else 64 if rh * rw >= 64 else _pow2_at_least_16(rh * rw)
    block_dv = min(64 if q.dtype == torch.float32 else 128, _pow2_at_least_16(dv))
    grid = (B * h * w * heads, triton.cdiv(rh * rw, block_q))
    _cell_attention_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), out, h, w, heads, d, dv, rh, rw, scale * LOG2_E,
        KH=kh, KW=kw, INPUT_PRECISION=dot_input_precision(q.dtype), BLOCK_Q=block_q,
        BLOCK_KV=_pow2_at_least_16(kh * kw), BLOCK_D=_pow2_at_least_16(d), BLOCK_DV=block_dv,
        num_warps=8 if block_q >= 128 else 4)
    return out

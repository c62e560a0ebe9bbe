"""2-D neighbourhood attention with NATTEN `na2d` semantics (NAF's upsampling attention).

Reference: `neighborhood_attention_2d_reference`, plain PyTorch for any q, k, v. Kernel (`neighborhood_attention_
triton`): the case NAF runs, keys and values at a low resolution nearest-repeated by exactly the dilation
(`kv_repeat`). Every output pixel of one low-res cell then attends to the same kh x kw low-res cells, so the kernel
loads that window once per block of the cell's pixels and never materialises the repeated maps (at T = 1024 with
1024 channels they are 5 GiB in fp32). `neighborhood_attention_2d` dispatches with `pixal3d_kernels.use_triton`.
"""
from __future__ import annotations

import torch

from . import use_triton


def neighborhood_indices(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """[length, kernel_size] indices of the 1-D neighbourhood of every position, as NATTEN defines it.

    Position i only sees positions of its own residue class i % dilation. Within the class the window of
    `kernel_size` is centred on i and shifted (not cropped or padded) to stay inside at the borders, so every
    position has exactly `kernel_size` neighbours.
    """
    if length < kernel_size * dilation:
        raise ValueError(f"neighbourhood attention needs length >= kernel_size * dilation, got {length} < "
                         f"{kernel_size} * {dilation}")
    i = torch.arange(length, device=device)
    residue = i % dilation
    class_length = (length - residue + dilation - 1) // dilation
    start = (i // dilation - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, class_length - kernel_size)
    return residue[:, None] + dilation * (start[:, None] + torch.arange(kernel_size, device=device))


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def neighborhood_attention_2d_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, dilation,
                                        scale: float | None = None,
                                        max_chunk_elements: int = 1 << 26) -> torch.Tensor:
    """2-D neighbourhood attention with NATTEN `na2d` semantics.

    q, k: [B, H, W, heads, D]; v: [B, H, W, heads, Dv] -> [B, H, W, heads, Dv]. `scale` defaults to D^-0.5.
    Query rows are processed in chunks and the kernel rows one at a time, so no intermediate holds more than
    about `max_chunk_elements` gathered neighbour values (a full gather is B*H*W*kh*kw*C, far too large at
    T = 1024 with 1024 channels). Softmax is computed in float32.
    """
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    B, H, W, heads, D = q.shape
    rows = neighborhood_indices(H, kh, dh, q.device)                                # [H, kh]
    cols = neighborhood_indices(W, kw, dw, q.device)                                # [W, kw]
    scale = D ** -0.5 if scale is None else scale
    out = v.new_empty(B, H, W, heads, v.shape[-1])
    per_row = B * W * kw * heads * max(D, v.shape[-1])
    chunk = max(1, max_chunk_elements // per_row)
    for r0 in range(0, H, chunk):
        row_nb = rows[r0:r0 + chunk]                                                # [h, kh]
        qc = q[:, r0:r0 + chunk] * scale
        # logits[..., a*kw + b] = q . k[row_nb[:, a], cols[:, b]]
        logits = torch.cat([torch.einsum("bhwnd,bhwjnd->bhwnj", qc, k[:, row_nb[:, a]][:, :, cols])
                            for a in range(kh)], -1)
        attn = logits.float().softmax(-1).to(v.dtype)
        acc = 0
        for a in range(kh):
            acc = acc + torch.einsum("bhwnj,bhwjnd->bhwnd", attn[..., a * kw:(a + 1) * kw],
                                     v[:, row_nb[:, a]][:, :, cols])
        out[:, r0:r0 + chunk] = acc
    return out


def repeat_cells(x: torch.Tensor, repeat: tuple[int, int]) -> torch.Tensor:
    """[B, h, w, ...] -> [B, h*rh, w*rw, ...], every cell repeated (= nearest-exact upsampling by integers)."""
    return x.repeat_interleave(repeat[0], 1).repeat_interleave(repeat[1], 2)


def neighborhood_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, dilation,
                              scale: float | None = None, kv_repeat=None,
                              max_chunk_elements: int = 1 << 26) -> torch.Tensor:
    """The reference's attention; with `kv_repeat` = (rh, rw), k [B, H/rh, W/rw, heads, D] and v [..., Dv] are
    given at low resolution and stand for `repeat_cells(k, kv_repeat)` (and v likewise).

    The Triton kernel runs where `use_triton`, `kv_repeat` equals the dilation and no gradient is needed; anything
    else runs the reference (on the repeated maps).
    """
    if kv_repeat is not None:
        kv_repeat = _pair(kv_repeat)
        expected = (q.shape[1] // kv_repeat[0], q.shape[2] // kv_repeat[1])
        if tuple(k.shape[1:3]) != expected or tuple(v.shape[1:3]) != expected or \
                q.shape[1] % kv_repeat[0] or q.shape[2] % kv_repeat[1]:
            raise ValueError(f"kv_repeat {kv_repeat} needs k, v of {expected} cells for queries of "
                             f"{tuple(q.shape[1:3])}, got {tuple(k.shape[1:3])} and {tuple(v.shape[1:3])}")
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if kv_repeat == _pair(dilation) and use_triton(q) and not needs_grad:
            from . import neighborhood_attention_triton

            return neighborhood_attention_triton.cell_attention(q, k, v, _pair(kernel_size), scale)
        k, v = repeat_cells(k, kv_repeat), repeat_cells(v, kv_repeat)
    return neighborhood_attention_2d_reference(q, k, v, kernel_size, dilation, scale, max_chunk_elements)

"""Rasterisation of a UV layout: which triangle covers each texel centre, and where.

Vectorised over triangles in chunks: every texel centre in a triangle's bounding box is tested with edge
functions; a texel covered by several triangles (shared edges) keeps the highest triangle index, a
deterministic rule on every device (`scatter_reduce amax`). Plain tensor ops, so it runs on CPU and GPU
alike; `kernels/uv_raster.py` may replace it with a fused kernel giving the same result.
"""
from __future__ import annotations

import torch


def _barycentric(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Barycentric coordinates of 2-D points p in triangles (a, b, c); [..., 3]."""
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = torch.where(den == 0, torch.ones_like(den), den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    return torch.stack([1 - w1 - w2, w1, w2], -1)


def rasterize_uv(uvs: torch.Tensor, faces: torch.Tensor, size: int,
                 pairs_per_chunk: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterises triangles given by `uvs` [V, 2] in [0, 1] (u across columns, v down rows) at `size` x `size`.

    Returns (triangle [size, size] int64, -1 where uncovered; barycentrics [size, size, 3] float32).
    """
    dev = uvs.device
    tri = uvs[faces].double() * size - 0.5                # texel centre (i + 0.5) -> integer i
    lo = torch.ceil(tri.amin(1)).long().clamp(0, size - 1)
    hi = torch.floor(tri.amax(1)).long().clamp(0, size - 1)
    ext = (hi - lo + 1).clamp_min(0)
    count = ext[:, 0] * ext[:, 1]
    owner = torch.full((size * size,), -1, dtype=torch.long, device=dev)
    chunk_of = torch.cumsum(count, 0) // pairs_per_chunk
    eps = 1e-9
    for c in torch.unique(chunk_of).tolist():
        sel = torch.nonzero(chunk_of == c)[:, 0]
        n = count[sel]
        t = torch.repeat_interleave(sel, n)
        local = torch.arange(t.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        x = lo[t, 0] + local % ext[t, 0]
        y = lo[t, 1] + local // ext[t, 0]
        p = torch.stack([x, y], -1).double()
        w = _barycentric(p, tri[t, 0], tri[t, 1], tri[t, 2])
        inside = (w >= -eps).all(-1)
        owner.scatter_reduce_(0, (y * size + x)[inside], t[inside], reduce="amax")
    covered = owner >= 0
    bary = torch.zeros(size * size, 3, dtype=torch.float32, device=dev)
    pix = torch.nonzero(covered)[:, 0]
    p = torch.stack([pix % size, pix // size], -1).double()
    f = owner[pix]
    bary[pix] = _barycentric(p, tri[f, 0], tri[f, 1], tri[f, 2]).clamp_min(0).float()
    bary[pix] /= bary[pix].sum(-1, keepdim=True)
    return owner.view(size, size), bary.view(size, size, 3)

"""UV-space rasterisation and sparse-voxel attribute sampling: the two per-texel steps of the export bake.

`rasterize_uv` finds, for every texel centre of a size x size map, the triangle of a UV layout that covers it
and the texel's barycentric coordinates in that triangle. A texel covered by several triangles (shared edges)
keeps the highest triangle index, a rule that gives the same map on every device and in any order of work.
Coverage is decided in float64 with the same edge functions, in the same order of operations, by the reference
and by the kernel (which is compiled without multiply-add fusion), so the two give the same triangle per texel;
barycentrics agree to float32 rounding (~1e-7).

`sample_voxel_field` samples a sparse voxel attribute field trilinearly with the `o_voxel` /
`flex_gemm.grid_sample_3d` convention (spec §6.2): voxel `c` holds its value at grid coordinate `c + 0.5`, grid
coordinate `u = (p + 0.5) * resolution`; the 8 voxels around `u - 0.5` that exist are weighted by their
renormalised trilinear weights; a point with none of them gets zero and `found = False`. The voxels are looked
up by binary search in their sorted keys `(x * R + y) * R + z`. The kernel searches once per (x, y) column of
the 8 corners: the corner above in z has the next key, so it sits at the found position or the one after.
Values agree with the reference to float32 rounding (relative 1e-6).

Each public function runs the Triton kernel on CUDA tensors and the plain-PyTorch reference elsewhere (see
`pixal3d_kernels.use_triton`); the reference is the CPU path of the exporter.
"""
from __future__ import annotations

import torch

from . import triton_importable, use_triton

# A texel centre is inside a triangle when all three barycentrics are >= -INSIDE_EPS (texel units are ~1, so this
# only closes float64 cracks along shared edges).
INSIDE_EPS = 1e-9
_CORNERS = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


# ---------------------------------------------------------------------------------------------------------
# plain-PyTorch references
# ---------------------------------------------------------------------------------------------------------

def _barycentric(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Barycentric coordinates of 2-D points p in triangles (a, b, c); [..., 3]."""
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
    den = torch.where(den == 0, torch.ones_like(den), den)
    w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
    w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
    return torch.stack([1 - w1 - w2, w1, w2], -1)


def _texel_triangles(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """float64 [F, 3, 2] triangle corners in texel units, where texel centre (i + 0.5) / size lands on integer i."""
    return uvs[faces].double() * size - 0.5


def rasterize_uv_reference(uvs: torch.Tensor, faces: torch.Tensor, size: int,
                           pairs_per_chunk: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised over (triangle, texel of its bounding box) pairs in chunks; see `rasterize_uv`."""
    dev = uvs.device
    tri = _texel_triangles(uvs, faces, size)
    lo = torch.ceil(tri.amin(1)).long().clamp(0, size - 1)
    hi = torch.floor(tri.amax(1)).long().clamp(0, size - 1)
    ext = (hi - lo + 1).clamp_min(0)
    count = ext[:, 0] * ext[:, 1]
    owner = torch.full((size * size,), -1, dtype=torch.long, device=dev)
    chunk_of = torch.cumsum(count, 0) // pairs_per_chunk
    for c in torch.unique(chunk_of).tolist():
        sel = torch.nonzero(chunk_of == c)[:, 0]
        n = count[sel]
        t = torch.repeat_interleave(sel, n)
        local = torch.arange(t.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        x = lo[t, 0] + local % ext[t, 0]
        y = lo[t, 1] + local // ext[t, 0]
        p = torch.stack([x, y], -1).double()
        w = _barycentric(p, tri[t, 0], tri[t, 1], tri[t, 2])
        inside = (w >= -INSIDE_EPS).all(-1)
        owner.scatter_reduce_(0, (y * size + x)[inside], t[inside], reduce="amax")
    covered = owner >= 0
    bary = torch.zeros(size * size, 3, dtype=torch.float32, device=dev)
    pix = torch.nonzero(covered)[:, 0]
    p = torch.stack([pix % size, pix // size], -1).double()
    f = owner[pix]
    b = _barycentric(p, tri[f, 0], tri[f, 1], tri[f, 2]).clamp_min(0).float()
    bary[pix] = b / b.sum(-1, keepdim=True)
    return owner.view(size, size), bary.view(size, size, 3)


def voxel_keys(cells: torch.Tensor, resolution: int) -> torch.Tensor:
    """int64 keys `(x * R + y) * R + z` of integer cells [..., 3]; sorted keys are x-major voxel order."""
    cells = cells.long()
    return (cells[..., 0] * resolution + cells[..., 1]) * resolution + cells[..., 2]


def lookup_voxels(keys: torch.Tensor, resolution: int, cells: torch.Tensor) -> torch.Tensor:
    """Row in the sorted `keys` of each integer cell [..., 3], or -1 where that voxel does not exist."""
    inside = ((cells >= 0) & (cells < resolution)).all(-1)
    query = voxel_keys(cells.clamp(0, resolution - 1), resolution)
    pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
    found = inside & (keys[pos] == query)
    return torch.where(found, pos, torch.full_like(pos, -1))


def sample_voxel_field_reference(keys: torch.Tensor, values: torch.Tensor, resolution: int,
                                 points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See `sample_voxel_field`."""
    u = (points.float() + 0.5) * resolution - 0.5
    base = torch.floor(u)
    frac = u - base
    corners = _CORNERS.to(points.device)
    cells = base.long()[:, None, :] + corners[None]                              # [P, 8, 3]
    w = torch.where(corners[None].bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
    rows = lookup_voxels(keys, resolution, cells)
    w = w * (rows >= 0)
    total = w.sum(-1, keepdim=True)
    found = total[:, 0] > 0
    w = w / total.clamp_min(1e-12)
    vals = values[rows.clamp_min(0)]                                             # [P, 8, C]
    return (w[..., None] * vals).sum(1), found


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------

if triton_importable():
    import triton
    import triton.language as tl
    _INSIDE_EPS = tl.constexpr(INSIDE_EPS)      # kernels read module globals only as constexpr

    @triton.jit
    def _cover_kernel(tri_ptr, owner_ptr, size, BLOCK: tl.constexpr):
        """One program per triangle: every texel of its bounding box, BLOCK at a time; `atomic_max` keeps the
        highest covering triangle."""
        t = tl.program_id(0)
        base = tri_ptr + t.to(tl.int64) * 6
        ax, ay = tl.load(base + 0), tl.load(base + 1)
        bx, by = tl.load(base + 2), tl.load(base + 3)
        cx, cy = tl.load(base + 4), tl.load(base + 5)
        lo_x = tl.minimum(tl.maximum(tl.ceil(tl.minimum(tl.minimum(ax, bx), cx)), 0.0), size - 1.0).to(tl.int32)
        lo_y = tl.minimum(tl.maximum(tl.ceil(tl.minimum(tl.minimum(ay, by), cy)), 0.0), size - 1.0).to(tl.int32)
        hi_x = tl.minimum(tl.maximum(tl.floor(tl.maximum(tl.maximum(ax, bx), cx)), 0.0), size - 1.0).to(tl.int32)
        hi_y = tl.minimum(tl.maximum(tl.floor(tl.maximum(tl.maximum(ay, by), cy)), 0.0), size - 1.0).to(tl.int32)
        ext_x = tl.maximum(hi_x - lo_x + 1, 0)
        ext_y = tl.maximum(hi_y - lo_y + 1, 0)
        count = ext_x * ext_y
        v0x, v0y = bx - ax, by - ay
        v1x, v1y = cx - ax, cy - ay
        den = v0x * v1y - v1x * v0y
        den = tl.where(den == 0, 1.0, den)
        start = 0
        while start < count:
            local = start + tl.arange(0, BLOCK)
            live = local < count
            step = tl.maximum(ext_x, 1)
            x = lo_x + local % step
            y = lo_y + local // step
            v2x = x.to(tl.float64) - ax
            v2y = y.to(tl.float64) - ay
            w1 = (v2x * v1y - v1x * v2y) / den
            w2 = (v0x * v2y - v2x * v0y) / den
            w0 = 1 - w1 - w2
            inside = live & (w0 >= -_INSIDE_EPS) & (w1 >= -_INSIDE_EPS) & (w2 >= -_INSIDE_EPS)
            texel = y.to(tl.int64) * size + x
            tl.atomic_max(owner_ptr + texel, t + local * 0, mask=inside)
            start += BLOCK

    @triton.jit
    def _barycentric_kernel(tri_ptr, owner_ptr, bary_ptr, size, BLOCK: tl.constexpr):
        """Barycentrics of each covered texel in its triangle, clamped to >= 0 and renormalised (float32)."""
        texel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = texel < size * size
        f = tl.load(owner_ptr + texel, mask=live, other=-1)
        hit = live & (f >= 0)
        base = tri_ptr + tl.maximum(f, 0).to(tl.int64) * 6
        ax, ay = tl.load(base + 0, mask=hit, other=0.0), tl.load(base + 1, mask=hit, other=0.0)
        bx, by = tl.load(base + 2, mask=hit, other=0.0), tl.load(base + 3, mask=hit, other=0.0)
        cx, cy = tl.load(base + 4, mask=hit, other=0.0), tl.load(base + 5, mask=hit, other=0.0)
        v0x, v0y = bx - ax, by - ay
        v1x, v1y = cx - ax, cy - ay
        v2x = (texel % size).to(tl.float64) - ax
        v2y = (texel // size).to(tl.float64) - ay
        den = v0x * v1y - v1x * v0y
        den = tl.where(den == 0, 1.0, den)
        w1 = (v2x * v1y - v1x * v2y) / den
        w2 = (v0x * v2y - v2x * v0y) / den
        w0 = 1 - w1 - w2
        b0 = tl.maximum(w0, 0.0).to(tl.float32)
        b1 = tl.maximum(w1, 0.0).to(tl.float32)
        b2 = tl.maximum(w2, 0.0).to(tl.float32)
        total = b0 + b1 + b2
        total = tl.where(hit, total, 1.0)
        zero = tl.zeros_like(b0)
        out = bary_ptr + texel * 3
        tl.store(out + 0, tl.where(hit, b0 / total, zero), mask=live)
        tl.store(out + 1, tl.where(hit, b1 / total, zero), mask=live)
        tl.store(out + 2, tl.where(hit, b2 / total, zero), mask=live)

    @triton.jit
    def _lower_bound(keys_ptr, num_keys, query, mask, STEPS: tl.constexpr):
        """First position in sorted `keys` whose key is >= query (num_keys if none), per lane."""
        lo = tl.zeros_like(query)
        hi = tl.zeros_like(query) + num_keys
        for _ in range(STEPS):
            active = mask & (lo < hi)
            mid = (lo + hi) // 2
            key = tl.load(keys_ptr + mid, mask=active, other=0)
            right = key < query
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        return lo

    @triton.jit
    def _sample_kernel(points_ptr, keys_ptr, values_ptr, out_ptr, found_ptr, num_points, num_keys, resolution,
                       C: tl.constexpr, CP: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr):
        rows_p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = rows_p < num_points
        px = tl.load(points_ptr + rows_p * 3 + 0, mask=live, other=0.0)
        py = tl.load(points_ptr + rows_p * 3 + 1, mask=live, other=0.0)
        pz = tl.load(points_ptr + rows_p * 3 + 2, mask=live, other=0.0)
        ux = (px + 0.5) * resolution - 0.5
        uy = (py + 0.5) * resolution - 0.5
        uz = (pz + 0.5) * resolution - 0.5
        bx, by, bz = tl.floor(ux), tl.floor(uy), tl.floor(uz)
        fx, fy, fz = ux - bx, uy - by, uz - bz
        ix, iy, iz = bx.to(tl.int64), by.to(tl.int64), bz.to(tl.int64)
        channel = tl.arange(0, CP)
        c_live = channel < C
        acc = tl.zeros((BLOCK, CP), dtype=tl.float32)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        z0_in = (iz >= 0) & (iz < resolution)
        z1_in = (iz + 1 >= 0) & (iz + 1 < resolution)
        for corner in tl.static_range(4):
            dx = corner & 1
            dy = corner >> 1
            x, y = ix + dx, iy + dy
            column_in = live & (x >= 0) & (x < resolution) & (y >= 0) & (y < resolution)
            query = (x * resolution + y) * resolution + iz
            pos = _lower_bound(keys_ptr, num_keys, query, column_in, STEPS)
            key0 = tl.load(keys_ptr + pos, mask=column_in & (pos < num_keys), other=-1)
            # step past the z0 key whenever it is there, even when z0 itself is outside the grid and unused
            at0 = column_in & (pos < num_keys) & (key0 == query)
            hit0 = at0 & z0_in
            pos1 = pos + at0.to(tl.int64)
            key1 = tl.load(keys_ptr + pos1, mask=column_in & (pos1 < num_keys), other=-1)
            hit1 = column_in & z1_in & (pos1 < num_keys) & (key1 == query + 1)
            wxy = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
            w0 = tl.where(hit0, wxy * (1.0 - fz), 0.0)
            w1 = tl.where(hit1, wxy * fz, 0.0)
            total += w0 + w1
            v0 = tl.load(values_ptr + pos[:, None] * C + channel[None, :], mask=hit0[:, None] & c_live[None, :],
                         other=0.0)
            v1 = tl.load(values_ptr + pos1[:, None] * C + channel[None, :], mask=hit1[:, None] & c_live[None, :],
                         other=0.0)
            acc += w0[:, None] * v0 + w1[:, None] * v1
        found = total > 0
        out = acc / tl.maximum(total, 1e-12)[:, None]
        tl.store(out_ptr + rows_p[:, None] * C + channel[None, :], out, mask=live[:, None] & c_live[None, :])
        tl.store(found_ptr + rows_p, found.to(tl.int8), mask=live)


def _rasterize_uv_triton(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    tri = _texel_triangles(uvs, faces, size).contiguous()
    owner = torch.full((size * size,), -1, dtype=torch.int32, device=uvs.device)
    bary = torch.empty(size * size, 3, dtype=torch.float32, device=uvs.device)
    if faces.shape[0]:
        _cover_kernel[(faces.shape[0],)](tri, owner, size, BLOCK=32, num_warps=1, enable_fp_fusion=False)
    block = 256
    _barycentric_kernel[(triton.cdiv(size * size, block),)](tri, owner, bary, size, BLOCK=block,
                                                            enable_fp_fusion=False)
    return owner.long().view(size, size), bary.view(size, size, 3)


def _sample_voxel_field_triton(keys: torch.Tensor, values: torch.Tensor, resolution: int,
                               points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    points = points.float().contiguous()
    values = values.float().contiguous()
    num_points, channels = points.shape[0], values.shape[1]
    out = torch.empty(num_points, channels, dtype=torch.float32, device=points.device)
    found = torch.empty(num_points, dtype=torch.int8, device=points.device)
    if num_points == 0:
        return out, found.bool()
    block = 128
    _sample_kernel[(triton.cdiv(num_points, block),)](
        points, keys.contiguous(), values, out, found, num_points, keys.numel(), resolution,
        C=channels, CP=triton.next_power_of_2(channels), STEPS=max(1, keys.numel().bit_length()), BLOCK=block)
    return out, found.bool()


# ---------------------------------------------------------------------------------------------------------
# public, dispatching
# ---------------------------------------------------------------------------------------------------------

def rasterize_uv(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterises the triangles `faces` [F, 3] of `uvs` [V, 2] in [0, 1] (u across columns, v down rows) at
    size x size. Returns (triangle [size, size] int64, -1 where uncovered; barycentrics [size, size, 3] float32,
    zero where uncovered)."""
    if use_triton(uvs):
        return _rasterize_uv_triton(uvs, faces, size)
    return rasterize_uv_reference(uvs, faces, size)


def sample_voxel_field(keys: torch.Tensor, values: torch.Tensor, resolution: int,
                       points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples of the sparse field (sorted int64 `keys` [K] from `voxel_keys`, `values` [K, C] float32
    in key order, at `resolution`) at model-frame points [P, 3] in the cube [-0.5, 0.5]^3.
    Returns (values [P, C] float32, found [P] bool)."""
    if keys.numel() == 0:
        return torch.zeros(points.shape[0], values.shape[1], device=points.device), \
            torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    if use_triton(points):
        return _sample_voxel_field_triton(keys, values, resolution, points)
    return sample_voxel_field_reference(keys, values, resolution, points)

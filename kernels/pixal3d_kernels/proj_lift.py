"""Projection lifting (spec §2.2): voxel grid points through V pinhole cameras, a bilinear border-padded sample of
each view's feature map, and the per-voxel fusion over views, fused in one kernel over the active voxels.

The cameras arrive already computed by the backend (`conditioning/proj_grid.py` holds the conventions: grid
points, Blender camera-to-world, focal length from the FOV): per view a world-to-camera matrix `w2c` [V, 4, 4]
(float32, inverted from the float32 camera-to-world as the official code does), a focal length in pixels and a
mesh scale; the grid points [N, 3] are the official `ProjGrid.grid_points` rows before `/ mesh_scale / 2`.
From there, per view v and point p:

    q = p / mesh_scale_v / 2;  cam = R_v q + t_v  (camera looks along -z);  depth = -cam_z
    u = f_v cam_x / (depth + 1e-8) + S / 2;   y = -f_v cam_y / (depth + 1e-8) + S / 2        (pixels, y down)
    feature = grid_sample(map_v, (uv + 0.5) / S * 2 - 1, bilinear, padding "border", align_corners=False)

with the grid rounded to the map's dtype first, as `F.grid_sample` receives it. Fusion ("reduce"): "none" keeps
one row block per view [V, N, C]; "mean" is the plain mean over views (official multi-view, border samples
included); "visible" the mean over the views that see the point inside the image and in front of the camera
(0 where none does).

Tolerance of the kernel against the reference: the projection is the same float32 arithmetic in another order
(no multiply-add fusion either way is promised), so pixel positions agree to ~1e-6 relative; features then agree
within 1e-4 absolute for unit-variance float32 maps up to 128 px (the error is the map's gradient times the
position error), and within 2 ulps of a half-precision map (the reference rounds each view before the mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_importable, use_triton

REDUCTIONS = ("none", "mean", "visible")


# ---------------------------------------------------------------------------------------------------------
# plain-PyTorch reference
# ---------------------------------------------------------------------------------------------------------

def project(points: torch.Tensor, mesh_scale: torch.Tensor, w2c: torch.Tensor, focal: torch.Tensor,
            image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel positions uv [V, N, 2] (x right, y down, before the half-pixel shift) and depths [V, N] of the grid
    points [N, 3] in V views (`mesh_scale`, `focal` [V], `w2c` [V, 4, 4])."""
    q = points[None] / mesh_scale[:, None, None] / 2
    cam = q @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    depth = -cam[..., 2]
    u = focal[:, None] * cam[..., 0] / (depth + 1e-8) + image_size / 2
    v = -focal[:, None] * cam[..., 1] / (depth + 1e-8) + image_size / 2
    return torch.stack([u, v], -1), depth


def visible(uv: torch.Tensor, depth: torch.Tensor, image_size: int) -> torch.Tensor:
    """[V, N] bool: inside the image and in front of the camera."""
    return ((uv >= 0) & (uv < image_size)).all(-1) & (depth > 0)


def sample(fmaps: torch.Tensor, uv: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear, border-padded samples of `fmaps` [V, C, H, W] (any size: the map covers the image) at pixel
    positions uv [V, N, 2] -> [V, N, C]."""
    grid = (uv + 0.5) / image_size * 2 - 1
    out = F.grid_sample(fmaps, grid[:, :, None, :].to(fmaps.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[..., 0].transpose(1, 2)


def fuse(feats: torch.Tensor, seen: torch.Tensor, reduce: str) -> torch.Tensor:
    """[V, N, C] per-view features -> the fusion `reduce` (see the module docstring)."""
    if reduce == "none":
        return feats
    if reduce == "mean":
        return feats.mean(0)
    weight = seen.to(feats.dtype)[..., None]
    return (feats * weight).sum(0) / weight.sum(0).clamp(min=1)


def lift_reference(fmaps: torch.Tensor, points: torch.Tensor, mesh_scale: torch.Tensor, w2c: torch.Tensor,
                   focal: torch.Tensor, image_size: int, reduce: str) -> torch.Tensor:
    uv, depth = project(points, mesh_scale, w2c, focal, image_size)
    seen = visible(uv, depth, image_size) if reduce == "visible" else None
    return fuse(sample(fmaps, uv, image_size), seen, reduce)


# ---------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _lift_kernel(fmap_ptr, points_ptr, scale_ptr, w2c_ptr, focal_ptr, out_ptr,
                     num_points, channels, height, width, image_size,
                     stride_v, stride_c, stride_h, stride_w,
                     V: tl.constexpr, REDUCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (point block, channel block); loops over the V views. REDUCE 0 none, 1 mean, 2 visible."""
        n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        n_live = n < num_points
        c_live = c < channels
        tile = n_live[:, None] & c_live[None, :]
        px = tl.load(points_ptr + n * 3 + 0, mask=n_live, other=0.0)
        py = tl.load(points_ptr + n * 3 + 1, mask=n_live, other=0.0)
        pz = tl.load(points_ptr + n * 3 + 2, mask=n_live, other=0.0)
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        seen_count = tl.zeros((BLOCK_N,), dtype=tl.float32)
        half = image_size / 2
        for v in tl.static_range(V):
            scale = tl.load(scale_ptr + v)
            qx, qy, qz = px / scale / 2, py / scale / 2, pz / scale / 2
            m = w2c_ptr + v * 16
            cam_x = tl.load(m + 0) * qx + tl.load(m + 1) * qy + tl.load(m + 2) * qz + tl.load(m + 3)
            cam_y = tl.load(m + 4) * qx + tl.load(m + 5) * qy + tl.load(m + 6) * qz + tl.load(m + 7)
            cam_z = tl.load(m + 8) * qx + tl.load(m + 9) * qy + tl.load(m + 10) * qz + tl.load(m + 11)
            depth = -cam_z
            f = tl.load(focal_ptr + v)
            u = f * cam_x / (depth + 1e-8) + half
            y = -f * cam_y / (depth + 1e-8) + half
            # grid_sample's grid, in the map's dtype, then its align_corners=False unnormalisation and border clip
            gx = ((u + 0.5) / image_size * 2 - 1).to(fmap_ptr.dtype.element_ty).to(tl.float32)
            gy = ((y + 0.5) / image_size * 2 - 1).to(fmap_ptr.dtype.element_ty).to(tl.float32)
            ix = tl.minimum(tl.maximum(((gx + 1) * width - 1) / 2, 0.0), width - 1.0)
            iy = tl.minimum(tl.maximum(((gy + 1) * height - 1) / 2, 0.0), height - 1.0)
            x0f, y0f = tl.floor(ix), tl.floor(iy)
            wx1, wy1 = ix - x0f, iy - y0f
            wx0, wy0 = (x0f + 1) - ix, (y0f + 1) - iy
            x0, y0 = x0f.to(tl.int64), y0f.to(tl.int64)
            x1_in = (x0 + 1) < width
            y1_in = (y0 + 1) < height
            base = fmap_ptr + v * stride_v + c[None, :] * stride_c
            row0 = base + (y0 * stride_h)[:, None]
            row1 = base + ((y0 + 1) * stride_h)[:, None]
            col0 = (x0 * stride_w)[:, None]
            col1 = ((x0 + 1) * stride_w)[:, None]
            f00 = tl.load(row0 + col0, mask=tile, other=0.0).to(tl.float32)
            f01 = tl.load(row0 + col1, mask=tile & x1_in[:, None], other=0.0).to(tl.float32)
            f10 = tl.load(row1 + col0, mask=tile & y1_in[:, None], other=0.0).to(tl.float32)
            f11 = tl.load(row1 + col1, mask=tile & (x1_in & y1_in)[:, None], other=0.0).to(tl.float32)
            feat = ((wx0 * wy0)[:, None] * f00 + (wx1 * wy0)[:, None] * f01
                    + (wx0 * wy1)[:, None] * f10 + (wx1 * wy1)[:, None] * f11)
            if REDUCE == 0:
                out = out_ptr + v * num_points * channels + n[:, None] * channels + c[None, :]
                tl.store(out, feat.to(out_ptr.dtype.element_ty), mask=tile)
            elif REDUCE == 1:
                acc += feat
            else:
                inside = (u >= 0) & (u < image_size) & (y >= 0) & (y < image_size) & (depth > 0)
                acc += tl.where(inside[:, None], feat, 0.0)
                seen_count += inside.to(tl.float32)
        if REDUCE != 0:
            if REDUCE == 1:
                fused = acc / V
            else:
                fused = acc / tl.maximum(seen_count, 1.0)[:, None]
            out = out_ptr + n[:, None] * channels + c[None, :]
            tl.store(out, fused.to(out_ptr.dtype.element_ty), mask=tile)


def _lift_triton(fmaps, points, mesh_scale, w2c, focal, image_size, reduce):
    views, channels, height, width = fmaps.shape
    num_points = points.shape[0]
    shape = (views, num_points, channels) if reduce == "none" else (num_points, channels)
    out = torch.empty(shape, dtype=fmaps.dtype, device=fmaps.device)
    if num_points == 0 or channels == 0:
        return out
    block_n, block_c = 32, min(128, triton.next_power_of_2(channels))
    grid = (triton.cdiv(num_points, block_n), triton.cdiv(channels, block_c))
    _lift_kernel[grid](fmaps, points.float().contiguous(), mesh_scale.float().contiguous(),
                       w2c.float().contiguous(), focal.float().contiguous(), out,
                       num_points, channels, height, width, image_size, *fmaps.stride(),
                       V=views, REDUCE=REDUCTIONS.index(reduce), BLOCK_N=block_n, BLOCK_C=block_c)
    return out


# ---------------------------------------------------------------------------------------------------------
# public, dispatching
# ---------------------------------------------------------------------------------------------------------

def lift(fmaps: torch.Tensor, points: torch.Tensor, mesh_scale: torch.Tensor, w2c: torch.Tensor,
         focal: torch.Tensor, image_size: int, reduce: str = "none") -> torch.Tensor:
    """Features of the grid points [N, 3] seen in V views: `fmaps` [V, C, H, W] (any strides: a channels-last map
    permuted to this shape is read in place), `mesh_scale`, `focal` [V], `w2c` [V, 4, 4], `image_size` the side of
    the image the cameras refer to. Returns [V, N, C] for reduce "none", else [N, C] (module docstring)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if fmaps.dim() != 4:
        raise ValueError(f"feature maps must be [V, C, H, W], got shape {tuple(fmaps.shape)}")
    if not (mesh_scale.shape[0] == w2c.shape[0] == focal.shape[0] == fmaps.shape[0]):
        raise ValueError(f"{fmaps.shape[0]} feature maps for {w2c.shape[0]} views")
    if use_triton(fmaps):
        return _lift_triton(fmaps, points, mesh_scale, w2c, focal, image_size, reduce)
    return lift_reference(fmaps, points, mesh_scale, w2c, focal, image_size, reduce)

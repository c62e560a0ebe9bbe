"""A small vectorised triangle rasteriser in plain PyTorch, for evaluation (no compiled extension, any device).

Conventions are those of `camera.py`: vertices are camera-local (OpenGL axes: x right, y up, looking along -z),
pixels follow `camera.Intrinsics` (x right, y down, pixel centres at integer + 0.5). A pixel is covered when its
centre lies inside a triangle; the nearest surface wins through one `scatter_reduce(amin)` per chunk on an int64
key that packs (depth, face index), so depth test and face lookup are a single exact, deterministic reduction.
Attributes are interpolated perspective-correctly. Anti-aliasing is left to the caller (render at `supersample`
times the resolution and average), which is how the procedural renderer of `data.render` anti-aliases too, so
both sides of a comparison are filtered alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .camera import Intrinsics

Tensor = torch.Tensor

_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Raster:
    face: Tensor        # [H, W] int64 index of the nearest face, -1 where no face covers the pixel centre
    bary: Tensor        # [H, W, 3] perspective-correct barycentric coordinates of the pixel centre in that face
    depth: Tensor       # [H, W] camera depth (-z) of the nearest surface, +inf where empty

    @property
    def mask(self) -> Tensor:
        return self.face >= 0


@dataclass
class Rendered:
    """An anti-aliased render: `color` is premultiplied by `alpha` (composited on black), `coverage` is the
    geometric pixel coverage (material alpha ignored), `depth` the full-resolution (supersampled) depth map."""
    color: Tensor       # [3, H, W]
    alpha: Tensor       # [H, W]
    coverage: Tensor    # [H, W]
    depth: Tensor       # [H * s, W * s], +inf where empty


def scaled(intrinsics: Intrinsics, factor: int) -> Intrinsics:
    """The same camera at `factor` times the resolution (pixel centres subdivide the original pixels)."""
    k = intrinsics
    return Intrinsics(k.width * factor, k.height * factor, k.focal * factor, k.cx * factor, k.cy * factor)


def project(points: Tensor, intrinsics: Intrinsics) -> tuple[Tensor, Tensor]:
    """Camera-local points [N, 3] -> (pixel coordinates [N, 2] (x right, y down), depth [N] along -z)."""
    depth = -points[:, 2]
    x = intrinsics.focal * points[:, 0] / depth + intrinsics.cx
    y = -intrinsics.focal * points[:, 1] / depth + intrinsics.cy
    return torch.stack([x, y], dim=1), depth


def _edge(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    """Twice the signed area of (a, b, p); positive when p is left of a -> b in a y-down image."""
    return (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0])


def _screen_barycentric(tri: Tensor, p: Tensor) -> Tensor:
    """Screen-space barycentrics [N, 3] of pixel points p [N, 2] in triangles tri [N, 3, 2]."""
    area = _edge(tri[:, 0], tri[:, 1], tri[:, 2])
    w0 = _edge(tri[:, 1], tri[:, 2], p) / area
    w1 = _edge(tri[:, 2], tri[:, 0], p) / area
    return torch.stack([w0, w1, 1.0 - w0 - w1], dim=1)


def rasterize(vertices: Tensor, faces: Tensor, intrinsics: Intrinsics, near: float = 1e-4,
              max_candidates: int = 1 << 22) -> Raster:
    """Z-buffered coverage of the triangles `faces [F, 3]` over `vertices [V, 3]` (camera-local).

    Each triangle enumerates the pixel centres of its screen bounding box; triangles are processed in chunks of
    at most `max_candidates` (pixel, triangle) pairs to bound memory. Triangles with a vertex closer than
    `near` are dropped rather than clipped: evaluation cameras always see the whole object in front of them.
    """
    W, H = intrinsics.width, intrinsics.height
    vertices = vertices.float()
    faces = faces.long()
    xy, z = project(vertices, intrinsics)
    tri_xy, tri_z = xy[faces], z[faces]                                          # [F, 3, 2], [F, 3]
    area = _edge(tri_xy[:, 0], tri_xy[:, 1], tri_xy[:, 2])
    keep = (tri_z > near).all(dim=1) & (area.abs() > 1e-12)
    lo = (tri_xy.amin(dim=1) - 0.5).ceil().clamp(min=0)                          # first pixel centre inside
    hi = (tri_xy.amax(dim=1) - 0.5).floor()
    hi = torch.minimum(hi, torch.tensor([W - 1.0, H - 1.0], device=hi.device))
    size = (hi - lo + 1).clamp(min=0).long()
    count = torch.where(keep, size[:, 0] * size[:, 1], 0)
    ids = count.nonzero().squeeze(1)

    zbuf = torch.full((H * W,), _EMPTY, dtype=torch.int64, device=vertices.device)
    start = 0
    cumulative = count[ids].cumsum(0)
    while start < len(ids):
        # The largest chunk within budget (always at least one triangle, however large it is).
        budget = (cumulative[start - 1] if start else 0) + max_candidates
        stop = max(int(torch.searchsorted(cumulative, budget, right=True)), start + 1)
        chunk = ids[start:stop]
        n = count[chunk]
        face = chunk.repeat_interleave(n)
        k = torch.arange(int(n.sum()), device=n.device) - (n.cumsum(0) - n).repeat_interleave(n)
        width = size[face, 0]
        px = lo[face, 0] + (k % width)
        py = lo[face, 1] + (k // width)
        centre = torch.stack([px + 0.5, py + 0.5], dim=1)
        w = _screen_barycentric(tri_xy[face], centre)
        inside = (w >= -1e-6).all(dim=1)
        inv_depth = (w / tri_z[face]).sum(dim=1)                                  # 1/z is affine in screen space
        face, px, py, inv_depth = face[inside], px[inside], py[inside], inv_depth[inside]
        # Positive float32 depths order like their bit patterns, so (depth bits << 32 | face) sorts by depth.
        bits = (1.0 / inv_depth).float().view(torch.int32).long()
        zbuf.scatter_reduce_(0, (py * W + px).long(), (bits << 32) | face, reduce="amin")
        start = stop

    covered = zbuf != _EMPTY
    face_of = torch.where(covered, zbuf & 0xFFFFFFFF, -1)
    depth = torch.full((H * W,), float("inf"), device=vertices.device)
    depth[covered] = (zbuf[covered] >> 32).int().view(torch.float32)
    bary = torch.zeros(H * W, 3, device=vertices.device)
    pix = covered.nonzero().squeeze(1)
    if len(pix):
        f = face_of[pix]
        centre = torch.stack([(pix % W).float() + 0.5, (pix // W).float() + 0.5], dim=1)
        w = _screen_barycentric(tri_xy[f], centre).clamp(min=0.0) / tri_z[f]     # perspective correction
        bary[pix] = w / w.sum(dim=1, keepdim=True)
    return Raster(face_of.reshape(H, W), bary.reshape(H, W, 3), depth.reshape(H, W))


def interpolate(raster: Raster, faces: Tensor, attributes: Tensor) -> Tensor:
    """Per-vertex `attributes [V, C]` at every pixel [H, W, C] (zeros where empty)."""
    face = raster.face.clamp(min=0)
    corners = attributes[faces.long()[face]]                                      # [H, W, 3, C]
    out = (raster.bary[..., None] * corners).sum(dim=2)
    return torch.where(raster.mask[..., None], out, torch.zeros_like(out))


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of `texture [T, T, C]` at glTF `uv [H, W, 2]` ((0, 0) = the first texel row's left)."""
    grid = (uv * 2.0 - 1.0)[None]                                                 # grid_sample: (-1, -1) = top left
    out = F.grid_sample(texture.permute(2, 0, 1)[None].float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0].permute(1, 2, 0)


def render_albedo(vertices: Tensor, faces: Tensor, uvs: Tensor, base_color: Tensor, intrinsics: Intrinsics,
                  alpha_mode: str = "OPAQUE", alpha_cutoff: float = 0.5, supersample: int = 2) -> Rendered:
    """Unlit render of a textured mesh: base colour (sRGB as stored) and material alpha as a glTF viewer would
    apply `alpha_mode`, premultiplied and averaged over `supersample`^2 samples per pixel.

    `base_color [T, T, 4]` in [0, 1]; vertices camera-local.
    """
    raster = rasterize(vertices, faces, scaled(intrinsics, supersample))
    texel = sample_texture(base_color, interpolate(raster, faces, uvs.float()))
    mask = raster.mask.float()
    if alpha_mode == "OPAQUE":
        alpha = mask
    elif alpha_mode == "MASK":
        alpha = mask * (texel[..., 3] >= alpha_cutoff).float()
    else:
        alpha = mask * texel[..., 3]
    premultiplied = torch.cat([texel[..., :3] * alpha[..., None], alpha[..., None], mask[..., None]], dim=-1)
    pooled = F.avg_pool2d(premultiplied.permute(2, 0, 1)[None], supersample)[0]
    return Rendered(color=pooled[:3], alpha=pooled[3], coverage=pooled[4], depth=raster.depth)

"""Baking PBR maps and a tangent-space normal map into a UV layout.

Every covered texel gives a 3-D point on the low-poly (decimated) mesh, where the voxel attributes are sampled
with the §6.2 trilinear convention: that mesh lies within a fraction of a voxel of the decoded surface and the
renormalised trilinear field is smooth at that scale, so no snapping is needed. The normal map reads the smooth
normal of the reference (full-resolution decoded) surface at the texel's closest point on it.

Tangent frame (MikkTSpace-compatible, what Blender and glTF viewers rebuild from the UVs): per vertex, the
face tangents dp/du are projected onto the vertex normal's plane, normalised, and summed with corner-angle
weights; the bitangent is `sign * cross(n, t)` with `sign` the handedness of the UV layout, and the UVs are
taken in the OpenGL orientation (v up the image, i.e. 1 - glTF v). The map stores
`(N.t, N.b, N.n) * 0.5 + 0.5`: +X right, +Y (green) up, as glTF and Blender expect.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pixal3d_kernels.uv_raster import rasterize_uv

from .closest import ClosestTriangleBand
from .inpaint import inpaint
from .voxel_field import SparseVoxelField


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted smooth vertex normals."""
    t = vertices[faces]
    n = torch.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], dim=-1)
    out = torch.zeros_like(vertices)
    for k in range(3):
        out.index_add_(0, faces[:, k], n)
    return F.normalize(out, dim=-1)


def vertex_tangents(vertices: torch.Tensor, normals: torch.Tensor, uvs: torch.Tensor,
                    faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex tangents [V, 4] (xyz unit, w = handedness +-1) from glTF-convention UVs; see module doc."""
    p = vertices[faces]
    uv = uvs[faces].clone()
    uv[..., 1] = 1.0 - uv[..., 1]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    d1, d2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    flip = torch.where(det < 0, -1.0, 1.0)
    t_face = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * flip[:, None]        # dp/du up to a positive scale
    tangent = torch.zeros_like(vertices)
    handed = torch.zeros(vertices.shape[0], dtype=vertices.dtype, device=vertices.device)
    for k in range(3):
        a = F.normalize(p[:, (k + 1) % 3] - p[:, k], dim=-1)
        b = F.normalize(p[:, (k + 2) % 3] - p[:, k], dim=-1)
        angle = torch.acos((a * b).sum(-1).clamp(-1, 1))
        n = normals[faces[:, k]]
        t = F.normalize(t_face - n * (n * t_face).sum(-1, keepdim=True), dim=-1)
        tangent.index_add_(0, faces[:, k], t * angle[:, None])
        handed.index_add_(0, faces[:, k], flip * angle)
    tangent = F.normalize(tangent - normals * (normals * tangent).sum(-1, keepdim=True), dim=-1)
    return torch.cat([tangent, torch.where(handed < 0, -1.0, 1.0)[:, None]], -1)


@dataclass
class Reference:
    """The full-resolution surface the normal map is baked from, with its closest-triangle band."""
    vertices: torch.Tensor
    faces: torch.Tensor
    normals: torch.Tensor
    band: ClosestTriangleBand


@dataclass
class BakedMaps:
    """Float maps [C, T, T] in [0, 1] (rows = glTF v), every texel filled."""
    base_color: torch.Tensor        # RGB
    alpha: torch.Tensor             # [1, T, T]
    metallic: torch.Tensor          # [1, T, T]
    roughness: torch.Tensor         # [1, T, T]
    normal: torch.Tensor | None     # RGB-encoded tangent-space normal
    coverage: torch.Tensor          # [T, T] bool, texels covered by a triangle


def _interp(values: torch.Tensor, faces: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    return (values[faces] * bary[..., None]).sum(-2)


def bake(vertices: torch.Tensor, normals: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor,
         field: SparseVoxelField, size: int, reference: Reference | None) -> BakedMaps:
    """Bakes the maps of the low-poly mesh (model frame; normals, uvs per vertex) at size x size, with a normal
    map when a reference surface is given."""
    owner, bary = rasterize_uv(uvs, faces, size)
    owner, bary = owner.reshape(-1), bary.reshape(-1, 3)
    pix = torch.nonzero(owner >= 0)[:, 0]
    f = faces[owner[pix]]
    b = bary[pix]
    points = _interp(vertices, f, b)
    attrs, found = field.sample(points)
    attrs = attrs.clamp(0, 1)

    def image(channels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        img = torch.zeros(channels.shape[1], size * size, dtype=torch.float32, device=channels.device)
        img[:, pix] = channels.T.float()
        mask = torch.zeros(size * size, dtype=torch.bool, device=channels.device)
        mask[pix] = valid
        return inpaint(img.view(-1, size, size), mask.view(size, size))

    normal = None
    if reference is not None:
        ref_tri, ref_bary, _ = reference.band.query(reference.vertices, reference.faces, points)
        n = F.normalize(_interp(normals, f, b), dim=-1)
        tangents = vertex_tangents(vertices, normals, uvs, faces)
        t = _interp(tangents[:, :3], f, b)
        t = F.normalize(t - n * (n * t).sum(-1, keepdim=True), dim=-1)
        bt = torch.where(_interp(tangents[:, 3:], f, b) < 0, -1.0, 1.0) * torch.cross(n, t, dim=-1)
        hit = ref_tri >= 0
        high = _interp(reference.normals, reference.faces[ref_tri.clamp_min(0)], ref_bary)
        high = F.normalize(torch.where(hit[:, None], high, n), dim=-1)
        ts = torch.stack([(high * t).sum(-1), (high * bt).sum(-1), (high * n).sum(-1)], -1)
        # a reference normal facing away from the low-poly one (an inner sheet) cannot be shown: keep it in front
        ts[:, 2] = ts[:, 2].clamp_min(0.05)
        encoded = image(F.normalize(ts, dim=-1) * 0.5 + 0.5, torch.ones_like(hit))
        normal = F.normalize(encoded * 2 - 1, dim=0) * 0.5 + 0.5
    coverage = torch.zeros(size * size, dtype=torch.bool, device=uvs.device)
    coverage[pix] = True
    return BakedMaps(base_color=image(attrs[:, 0:3], found), alpha=image(attrs[:, 5:6], found),
                     metallic=image(attrs[:, 3:4], found), roughness=image(attrs[:, 4:5], found),
                     normal=normal, coverage=coverage.view(size, size))

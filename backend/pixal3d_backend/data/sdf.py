"""Signed distance functions of primitives and CSG operators, batched over query points.

Every primitive takes points `p [P,3]` in its own local frame (y up) and returns `[P]` signed distances
(negative inside). Distances are exact except for the ellipsoid, whose bound is the usual first-order
approximation; all fields are 1-Lipschitz up to that approximation, which is what sphere tracing and the
narrow-band searches in `targets.py` rely on. Formulas follow the standard closed forms (Quilez).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _length2(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


def _box2(dx: Tensor, dy: Tensor) -> Tensor:
    """Distance given the per-axis excess of a point over a 2-D box: exact outside and inside."""
    outside = _length2(dx.clamp(min=0), dy.clamp(min=0))
    return outside + torch.maximum(dx, dy).clamp(max=0)


def sphere(p: Tensor, radius: Tensor) -> Tensor:
    return p.norm(dim=-1) - radius


def box(p: Tensor, half_extents: Tensor) -> Tensor:
    q = p.abs() - half_extents
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def rounded_box(p: Tensor, half_extents: Tensor, radius: Tensor) -> Tensor:
    return box(p, half_extents - radius) - radius


def ellipsoid(p: Tensor, radii: Tensor) -> Tensor:
    k0 = (p / radii).norm(dim=-1)
    k1 = (p / (radii * radii)).norm(dim=-1)
    return k0 * (k0 - 1.0) / k1.clamp(min=1e-12)


def cylinder(p: Tensor, radius: Tensor, half_height: Tensor) -> Tensor:
    """Capped cylinder around the y axis."""
    return _box2(_length2(p[:, 0], p[:, 2]) - radius, p[:, 1].abs() - half_height)


def capsule(p: Tensor, half_height: Tensor, radius: Tensor) -> Tensor:
    """Segment from (0,-h,0) to (0,h,0) inflated by `radius`."""
    y = p[:, 1] - p[:, 1].clamp(-half_height, half_height)
    return torch.sqrt(p[:, 0] ** 2 + y * y + p[:, 2] ** 2) - radius


def torus(p: Tensor, major_radius: Tensor, minor_radius: Tensor) -> Tensor:
    """Torus in the xz plane around the y axis."""
    return _length2(_length2(p[:, 0], p[:, 2]) - major_radius, p[:, 1]) - minor_radius


def cone(p: Tensor, half_height: Tensor, radius_bottom: Tensor, radius_top: Tensor) -> Tensor:
    """Capped cone (frustum) around the y axis, bottom cap at y=-h, top cap at y=+h (exact)."""
    qx, qy = _length2(p[:, 0], p[:, 2]), p[:, 1]
    h = half_height
    k1x, k1y = radius_top, h
    k2x, k2y = radius_top - radius_bottom, 2.0 * h
    cap_r = torch.where(qy < 0, radius_bottom, radius_top)
    cax = qx - torch.minimum(qx, cap_r)
    cay = qy.abs() - h
    t = (((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0.0, 1.0)
    cbx = qx - k1x + k2x * t
    cby = qy - k1y + k2y * t
    inside = (cbx < 0) & (cay < 0)
    dist = torch.sqrt(torch.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby))
    return torch.where(inside, -dist, dist)


def polygon2d(q: Tensor, vertices: Tensor) -> Tensor:
    """Exact signed distance of 2-D points `q [P,2]` to a closed simple polygon `vertices [N,2]`.

    Vectorised over points and edges: the unsigned distance is the minimum over edges, the sign is the
    parity of the crossings of a ray (the winding test of the standard polygon SDF).
    """
    v_i = vertices                               # [N,2]
    v_j = torch.roll(vertices, 1, dims=0)        # previous vertex
    e = v_j - v_i                                # [N,2]
    w = q[:, None, :] - v_i[None]                # [P,N,2]
    t = ((w * e).sum(-1) / (e * e).sum(-1).clamp(min=1e-20)).clamp(0.0, 1.0)
    b = w - e * t[..., None]
    dist = (b * b).sum(-1).min(dim=1).values.sqrt()
    above_i = q[:, None, 1] >= v_i[None, :, 1]
    below_j = q[:, None, 1] < v_j[None, :, 1]
    left = e[None, :, 0] * w[..., 1] > e[None, :, 1] * w[..., 0]
    flips = ((above_i & below_j & left) | (~above_i & ~below_j & ~left)).sum(dim=1)
    sign = 1.0 - 2.0 * (flips % 2).to(q.dtype)
    return sign * dist


def extrusion(p: Tensor, profile: Tensor, half_depth: Tensor) -> Tensor:
    """A 2-D polygon in the xy plane extruded along z over [-half_depth, half_depth]."""
    return _box2(polygon2d(p[:, :2], profile), p[:, 2].abs() - half_depth)


def lathe(p: Tensor, profile: Tensor) -> Tensor:
    """A profile revolved around the y axis. `profile [N,2]` is a chain of (radius >= 0, y) points from the
    axis back to the axis; the section is closed with its mirror image (radius -> -radius), so the axis
    itself is not a surface and interior distances stay exact."""
    mirrored = torch.flip(profile[1:-1], dims=[0]) * torch.tensor([-1.0, 1.0], device=profile.device)
    q = torch.stack([_length2(p[:, 0], p[:, 2]), p[:, 1]], dim=-1)
    return polygon2d(q, torch.cat([profile, mirrored]))


# --------------------------------------------------------------------------------------------------------
# CSG operators on distance values. `smooth_union` is the polynomial smooth minimum; its gradient is a convex
# combination of the operands' gradients, so it stays 1-Lipschitz.
# --------------------------------------------------------------------------------------------------------

def union(a: Tensor, b: Tensor) -> Tensor:
    return torch.minimum(a, b)


def subtraction(a: Tensor, b: Tensor) -> Tensor:
    """`a` with `b` carved out."""
    return torch.maximum(a, -b)


def intersection(a: Tensor, b: Tensor) -> Tensor:
    return torch.maximum(a, b)


def smooth_union(a: Tensor, b: Tensor, blend: float) -> Tensor:
    h = (0.5 + 0.5 * (b - a) / blend).clamp(0.0, 1.0)
    return b + (a - b) * h - blend * h * (1.0 - h)

"""Batched sphere-tracing renderer with metallic-roughness PBR shading.

All views of one object are traced together: every pixel ray of every view is mapped into the object's
normalised frame and marched through one `ObjectField`, with finished rays compacted away each step, so the
work is a handful of large tensor ops per step on any device.

Pixels follow the pinhole of `camera.py`: square image of side S, focal `camera.focal_pixels(fov, S)`, pixel
(i, j) centred at (i + 0.5, j + 0.5), image x right = +x_v, image y down = -y_v, the camera at
`(0, 0, mesh_scale * d)` of the model frame looking along -z_v. This is the standard (Blender) pinhole, so
renders match the images the product is used on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import camera
from .shapes import ObjectField
from .views import View

Tensor = torch.Tensor

BOUNDING_RADIUS = math.sqrt(3.0) / 2.0 + 1e-3   # a normalised object lies in [-0.5, 0.5]^3


@dataclass
class Renders:
    rgba: Tensor           # [B,4,S,S] straight (non-premultiplied) sRGB colour and alpha
    conditioning: Tensor   # [B,3,S,S] colour premultiplied by alpha, i.e. composited on black (training input)
    coverage: Tensor       # [B,S,S] fraction of each pixel covered by the object (alpha ignoring material)
    cameras: Tensor        # [B,3] (fov radians, distance, mesh_scale) of each view


def pixel_rays(view: View, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Origins and unit directions `[S*S,3]` (row-major over image y, then x) in the normalised object frame."""
    f = camera.focal_pixels(view.fov, size)
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5 - size / 2.0) / f
    y, x = torch.meshgrid(-c, c, indexing="ij")
    dirs = F.normalize(torch.stack([x, y, -torch.ones_like(x)], dim=-1).reshape(-1, 3), dim=-1)
    rotation = torch.tensor(view.rotation, dtype=torch.float32, device=device)
    origin_model = torch.tensor([0.0, 0.0, view.mesh_scale * view.distance], device=device)
    origin = ((origin_model - torch.tensor(view.translation, dtype=torch.float32, device=device)) @ rotation) / view.scale
    return origin.expand_as(dirs), dirs @ rotation


def sphere_trace(field: ObjectField, origins: Tensor, dirs: Tensor, pixel_angle: Tensor,
                 max_steps: int = 128, relaxation: float = 0.95) -> tuple[Tensor, Tensor]:
    """March rays from the bounding sphere; returns (hit mask [R], hit distance [R]).

    A ray hits when the distance falls under a quarter of its pixel footprint (`pixel_angle * t`) or 1e-4.
    """
    oc = -(origins * dirs).sum(-1)                                 # t of the closest approach to the origin
    r2 = (origins * origins).sum(-1) - oc * oc
    half_chord = (BOUNDING_RADIUS ** 2 - r2).clamp(min=0).sqrt()
    t = (oc - half_chord).clamp(min=0)
    t_far = oc + half_chord
    hit = torch.zeros_like(t, dtype=torch.bool)
    active = (r2 < BOUNDING_RADIUS ** 2).nonzero().squeeze(1)
    for _ in range(max_steps):
        if not len(active):
            break
        ta = t[active]
        d = field.sdf(origins[active] + ta[:, None] * dirs[active])
        done = d < torch.clamp(0.25 * pixel_angle[active] * ta, min=1e-4)
        hit[active[done]] = True
        t[active] = ta + relaxation * d * (~done)
        active = active[~done & (t[active] < t_far[active])]
    return hit, t


def _soft_shadow(field: ObjectField, points: Tensor, to_light: Tensor, steps: int, k: float = 12.0) -> Tensor:
    """Visibility in [0,1] of a directional light (penumbra estimate from the closest miss along the ray)."""
    t = torch.full_like(points[:, 0], 4e-3)
    visibility = torch.ones_like(t)
    for _ in range(steps):
        d = field.sdf(points + t[:, None] * to_light)
        visibility = torch.minimum(visibility, (k * d / t).clamp(0.0, 1.0))
        t = t + d.clamp(2e-3, 0.1)
    return visibility


def _srgb_to_linear(c: Tensor) -> Tensor:
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: Tensor) -> Tensor:
    c = c.clamp(0.0, 1.0)
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1.0 / 2.4) - 0.055)


def shade(attributes: Tensor, normals: Tensor, to_eye: Tensor, light_dirs: Tensor, radiances: Tensor,
          visibility: Tensor, sky: Tensor, ground: Tensor, up: Tensor) -> Tensor:
    """Linear RGB `[P,3]`: Lambert diffuse + GGX specular (Smith-Schlick G, Schlick F) per directional light,
    plus a hemisphere ambient for diffuse and for the reflected direction (so metals are not black).

    `attributes [P,6]` in the official layout; `light_dirs [P,L,3]`, `radiances [L,3]`, `visibility [P,L]`.
    """
    base = _srgb_to_linear(attributes[:, :3])
    metallic, roughness = attributes[:, 3:4], attributes[:, 4:5].clamp(min=0.045)
    f0 = 0.04 + (base - 0.04) * metallic
    diffuse_albedo = base * (1.0 - metallic)
    a2 = (roughness * roughness) ** 2
    k = roughness * roughness / 2.0
    n_v = (normals * to_eye).sum(-1, keepdim=True).clamp(min=1e-4)

    l = light_dirs
    h = F.normalize(l + to_eye[:, None], dim=-1)
    n_l = (normals[:, None] * l).sum(-1, keepdim=True).clamp(min=0.0)        # [P,L,1]
    n_h = (normals[:, None] * h).sum(-1, keepdim=True).clamp(min=0.0)
    v_h = (to_eye[:, None] * h).sum(-1, keepdim=True).clamp(min=0.0)
    a2l = a2[:, None]
    distribution = a2l / (math.pi * (n_h * n_h * (a2l - 1.0) + 1.0) ** 2)
    geometry = (n_l / (n_l * (1 - k[:, None]) + k[:, None])) * (n_v / (n_v * (1 - k) + k))[:, None]
    fresnel = f0[:, None] + (1.0 - f0[:, None]) * (1.0 - v_h) ** 5
    specular = distribution * geometry * fresnel / (4.0 * n_l.clamp(min=1e-4) * n_v[:, None])
    diffuse = (1.0 - fresnel) * diffuse_albedo[:, None] / math.pi
    direct = ((diffuse + specular) * n_l * radiances[None] * visibility[..., None]).sum(1)

    hemisphere = lambda d: ground + (sky - ground) * (0.5 + 0.5 * (d @ up))[:, None]
    reflected = 2.0 * n_v * normals - to_eye
    env_fresnel = f0 + (torch.maximum(1.0 - roughness, f0) - f0) * (1.0 - n_v) ** 5
    ambient = diffuse_albedo * hemisphere(normals) + env_fresnel * hemisphere(reflected) * (1.0 - 0.5 * roughness)
    return direct + ambient


def render_views(field: ObjectField, views: list[View], image_size: int, supersample: int = 2,
                 max_steps: int = 128, shadow_steps: int = 24) -> Renders:
    """Render `views` of one object; each output pixel averages `supersample`^2 rays (premultiplied)."""
    device = field.device
    size = image_size * supersample
    rays = [pixel_rays(v, size, device) for v in views]
    origins = torch.cat([r[0] for r in rays])
    dirs = torch.cat([r[1] for r in rays])
    view_of_ray = torch.arange(len(views), device=device).repeat_interleave(size * size)
    pixel_angle = torch.tensor([1.0 / camera.focal_pixels(v.fov, size) for v in views],
                               device=device)[view_of_ray]
    hit, t = sphere_trace(field, origins, dirs, pixel_angle, max_steps)

    idx = hit.nonzero().squeeze(1)
    points = origins[idx] + t[idx, None] * dirs[idx]
    _, part = field.sdf_and_part(points)
    attributes = field.attributes(points, part).clamp(0.0, 1.0)
    normals = field.normals(points)
    # Light directions are given in the camera (= model) frame; the object frame sees them through R^T.
    rotations = torch.tensor(np.stack([v.rotation for v in views]), dtype=torch.float32, device=device)
    ray_view = view_of_ray[idx]
    lights = [torch.tensor(v.lighting.directions, dtype=torch.float32, device=device) @ rotations[i]
              for i, v in enumerate(views)]
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)
    up = as_tensor([0.0, 1.0, 0.0])          # the hemisphere light follows the object's up axis
    color = torch.zeros(len(idx), 3, device=device)
    for i, v in enumerate(views):
        sel = (ray_view == i).nonzero().squeeze(1)
        if not len(sel):
            continue
        p, n = points[sel], normals[sel]
        light_dirs = lights[i][None].expand(len(sel), -1, -1)
        visibility = torch.ones(len(sel), light_dirs.shape[1], device=device)
        if shadow_steps:
            visibility = torch.stack([_soft_shadow(field, p + 2e-3 * n, light_dirs[:, j], shadow_steps)
                                      for j in range(light_dirs.shape[1])], dim=1)
        color[sel] = shade(attributes[sel], n, -dirs[idx[sel]], light_dirs, as_tensor(v.lighting.radiances),
                           visibility, as_tensor(v.lighting.sky), as_tensor(v.lighting.ground), up)

    premultiplied = torch.zeros(len(hit), 4, device=device)
    alpha = attributes[:, 5:6]
    premultiplied[idx] = torch.cat([_linear_to_srgb(color) * alpha, alpha], dim=-1)
    coverage = hit.float().reshape(len(views), 1, size, size)
    premultiplied = premultiplied.reshape(len(views), size, size, 4).permute(0, 3, 1, 2)
    if supersample > 1:
        premultiplied = F.avg_pool2d(premultiplied, supersample)
        coverage = F.avg_pool2d(coverage, supersample)
    a = premultiplied[:, 3:4]
    straight = torch.where(a > 0, premultiplied[:, :3] / a.clamp(min=1e-8), torch.zeros_like(a))
    cameras = torch.tensor([[v.fov, v.distance, v.mesh_scale] for v in views], dtype=torch.float32)
    return Renders(rgba=torch.cat([straight, a], dim=1), conditioning=premultiplied[:, :3],
                   coverage=coverage[:, 0], cameras=cameras)

"""Voxel-grid conventions of the model cube and sparse narrow-band search over a distance field.

A grid of resolution R tiles the model cube [-0.5, 0.5]^3: voxel `c` (integer x, y, z in [0, R)) spans
`[-0.5 + c/R, -0.5 + (c+1)/R]`, lattice corner `g` (in [0, R]) sits at `-0.5 + g/R` (spec §6.1: dual vertex
`(c + offset)/R - 0.5`, aabb [-0.5, 0.5]^3).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor
DistanceFn = Callable[[Tensor], Tensor]


def voxel_centers(coords: Tensor, resolution: int) -> Tensor:
    return (coords.float() + 0.5) / resolution - 0.5


def lattice_points(coords: Tensor, resolution: int) -> Tensor:
    return coords.float() / resolution - 0.5


def dense_coords(resolution: int, device: torch.device) -> Tensor:
    r = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


_CHILDREN = torch.tensor([[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)])


def surface_voxels(distance: DistanceFn, resolution: int, device: torch.device, start_resolution: int = 16,
                   lipschitz_margin: float = 1.15) -> Tensor:
    """Coords `[N,3]` (int64, x-major order) of the voxels at `resolution` whose centre lies within half a
    voxel diagonal of the surface, `|sdf(centre)| <= sqrt(3)/2 / R`.

    For a 1-Lipschitz field this contains every voxel the surface passes through. It is found coarse to
    fine: a cell is refined only if its own centre is within (margin x) its half diagonal, which cannot
    drop a surface voxel below it; the cost is proportional to the surface area, not the volume.
    """
    start_resolution = min(start_resolution, resolution)
    if resolution % start_resolution or (resolution // start_resolution) & (resolution // start_resolution - 1):
        raise ValueError(f"resolution {resolution} must be start_resolution {start_resolution} times 2^k")
    coords, res = dense_coords(start_resolution, device), start_resolution
    while True:
        d = distance(voxel_centers(coords, res)).abs()
        half_diagonal = math.sqrt(3.0) / 2.0 / res
        if res == resolution:
            return coords[d <= half_diagonal]
        coords = coords[d <= lipschitz_margin * half_diagonal]
        coords = (coords[:, None, :] * 2 + _CHILDREN.to(device)).reshape(-1, 3)
        res *= 2


def project_to_surface(distance: DistanceFn, gradient: Callable[[Tensor], Tensor], p: Tensor,
                       steps: int = 3) -> Tensor:
    """Newton steps `p <- p - sdf(p) * n(p)` onto the zero level set (exact in one step for exact SDFs)."""
    for _ in range(steps):
        p = p - distance(p)[:, None] * gradient(p)
    return p


def support(distance: DistanceFn, gradient: Callable[[Tensor], Tensor], samples: Tensor, directions: Tensor,
            step: float, iterations: int = 10, candidates: int = 32) -> Tensor:
    """Support function `max_{p on surface} p . u` for each unit direction `u` of `directions [D,3]`.

    Starts from the `candidates` best surface `samples` per direction and climbs: step along `u`, project back
    onto the surface, keep the move if it went further, halve the step otherwise. Samples on a grid of
    spacing h miss a smooth extreme by about h^2 / (8 * curvature radius); this recovers it.
    """
    k = min(candidates, len(samples))
    best = samples[(samples @ directions.T).topk(k, dim=0).indices.T.reshape(-1)]      # [D*k,3]
    u = directions.repeat_interleave(k, dim=0)
    h = torch.full_like(best[:, :1], step)
    for _ in range(iterations):
        trial = project_to_surface(distance, gradient, best + h * u, steps=2)
        better = ((trial * u).sum(-1) > (best * u).sum(-1)) & (distance(trial).abs() < 1e-5)
        best = torch.where(better[:, None], trial, best)
        h = torch.where(better[:, None], h, h * 0.5)
    return (best * u).sum(-1).reshape(len(directions), k).max(dim=1).values

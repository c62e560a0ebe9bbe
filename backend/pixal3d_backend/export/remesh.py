"""Remeshing to a clean closed surface: narrow-band signed distance + marching cubes.

At grid resolution R (spacing h = 1/R over the model cube, plus a margin):
1. The band W = grid vertices within h of the input surface gets the exact unsigned distance and closest
   triangle (`ClosestTriangleBand`) and a sign from the angle-weighted pseudo-normal of the closest feature
   (Baerentzen & Aanaes), exact for a closed, consistently oriented input.
2. Every other grid vertex is outside if it is connected to the grid boundary without crossing W (flood fill),
   inside otherwise. Any grid edge that crosses the surface has an end within h/2 of it, so W is a wall.
3. Marching cubes over the cells that touch W. Two adjacent non-band vertices are in the same flood component
   and have the same sign, so every sign change is in those cells: the result is the closed 2-manifold
   boundary of a complete sign assignment, watertight whatever the input (open holes narrower than ~2h are
   sealed; a thin open sheet becomes a thin closed slab; inner junk becomes closed bubbles at worst).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .closest import ClosestTriangleBand, Grid
from .marching_cubes import marching_cubes

_MARGIN = 2        # grid vertices beyond the model cube on each side, so the boundary is always outside


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted (unnormalised: length = 2 * area) face normals."""
    t = vertices[faces]
    return torch.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], dim=-1)


def _pseudo_normals(vertices: torch.Tensor, faces: torch.Tensor):
    """Per face unit normal, per edge (keyed min*V+max) and per vertex angle-weighted pseudo-normals."""
    n = F.normalize(face_normals(vertices, faces), dim=-1)
    t = vertices[faces]
    vertex_n = torch.zeros_like(vertices)
    for k in range(3):
        e1 = F.normalize(t[:, (k + 1) % 3] - t[:, k], dim=-1)
        e2 = F.normalize(t[:, (k + 2) % 3] - t[:, k], dim=-1)
        angle = torch.acos((e1 * e2).sum(-1).clamp(-1, 1))
        vertex_n.index_add_(0, faces[:, k], n * angle[:, None])
    edges = torch.stack([faces[:, [1, 2]], faces[:, [2, 0]], faces[:, [0, 1]]], 1)  # edge k opposite corner k
    ekey = edges.amin(-1) * vertices.shape[0] + edges.amax(-1)                       # [F, 3]
    keys, inv = torch.unique(ekey, return_inverse=True)
    edge_n = torch.zeros(keys.numel(), 3, dtype=n.dtype, device=n.device)
    edge_n.index_add_(0, inv.reshape(-1), n[:, None, :].expand(-1, 3, -1).reshape(-1, 3))
    return n, edge_n[inv], vertex_n                                                  # edge_n per (face, k)


def _dilate(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    for d in range(3):
        n = x.shape[d]
        y.narrow(d, 1, n - 1).logical_or_(x.narrow(d, 0, n - 1))
        y.narrow(d, 0, n - 1).logical_or_(x.narrow(d, 1, n - 1))
    return y


def flood_outside(wall: torch.Tensor) -> torch.Tensor:
    """Vertices connected (6-neighbourhood) to the array boundary through non-wall vertices.

    Coarse-to-fine: a 2x coarser grid whose blocks are walls if any vertex is, solved recursively, seeds the fine
    fill exactly (a free coarse block is free and connected at the fine level); dilation then only has to
    reach into the blocks next to walls.
    """
    free = ~wall
    seed = torch.zeros_like(wall)
    for d in range(3):
        seed.narrow(d, 0, 1).fill_(True)
        seed.narrow(d, wall.shape[d] - 1, 1).fill_(True)
    if min(wall.shape) > 32:
        pad = [0, wall.shape[2] % 2, 0, wall.shape[1] % 2, 0, wall.shape[0] % 2]
        coarse = F.max_pool3d(F.pad(wall[None, None].float(), pad, value=1.0), 2)[0, 0] > 0
        up = flood_outside(coarse).repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        seed |= up[: wall.shape[0], : wall.shape[1], : wall.shape[2]]
    out = seed & free
    count = int(out.count_nonzero())      # ~20x faster than a bool sum on a CPU
    while True:
        for _ in range(2):
            out = _dilate(out) & free
        new = int(out.count_nonzero())
        if new == count:
            return out
        count = new


# The remeshed surface gets about this many times the face target, so the quadric decimation has room to place
# the faces (more only slows it down: 5.8 M -> 1 M faces took 12.7 s on the H200 host, BENCHMARKS.md).
DECIMATION_ROOM = 3.0
# The coarsest remesh grid: it seals holes and thickens sheets thinner than ~2 / R. Coarser is also better for the
# decimation: at 50k faces, a 192 grid (0.79 M faces to decimate) beat a 256 one (1.42 M) on 29 held-out objects
# (IoU 0.816 vs 0.772, F@0.05 visible 0.629 vs 0.610, H200, 2026-11-22; BENCHMARKS.md).
MIN_RESOLUTION = 192


def default_remesh_resolution(resolution: int, face_target: int, decoded_faces: int) -> int:
    """The grid R whose surface has about `DECIMATION_ROOM` x `face_target` triangles: a surface's triangle count
    grows as R^2, and the decoded mesh has `decoded_faces` at `resolution`. Rounded up to 64, at least
    `MIN_RESOLUTION`, never above the decoded resolution (finer grids would only re-sample the same surface)."""
    r = resolution * (DECIMATION_ROOM * face_target / max(decoded_faces, 1)) ** 0.5
    return int(min(max(MIN_RESOLUTION, 64 * math.ceil(r / 64)), resolution))


def remesh(vertices: torch.Tensor, faces: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed 2-manifold surface of the input at grid resolution `resolution` (model frame, cube [-0.5, 0.5]^3)."""
    vertices = vertices.float()
    h = 1.0 / resolution
    grid = Grid(origin=-0.5 - _MARGIN * h, spacing=h, dims=resolution + 1 + 2 * _MARGIN)
    band = ClosestTriangleBand.build(vertices, faces, grid, radius=h)

    n_face, n_edge, n_vertex = _pseudo_normals(vertices, faces)
    bary = band.bary
    on = bary > 1e-6
    tri = band.triangle
    pseudo = torch.where((on.sum(-1) == 3)[:, None], n_face[tri], torch.zeros_like(n_face[tri]))
    for k in range(3):
        edge_k = on.sum(-1) == 2
        edge_k &= ~on[:, k]
        pseudo = torch.where(edge_k[:, None], n_edge[tri, k], pseudo)
        vert_k = (on.sum(-1) == 1) & on[:, k]
        pseudo = torch.where(vert_k[:, None], n_vertex[faces[tri, k]], pseudo)
    p = grid.position(grid.index(band.keys))
    closest = (bary[:, :, None] * vertices[faces[tri]]).sum(1)
    sign = torch.where(((p - closest) * pseudo).sum(-1) < 0, -1.0, 1.0)
    band_value = sign * band.distance

    n = grid.dims
    wall = torch.zeros(n * n * n, dtype=torch.bool, device=vertices.device)
    wall[band.keys] = True
    outside = flood_outside(wall.view(n, n, n)).reshape(-1)

    corner = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], device=vertices.device)
    cells = grid.index(torch.unique(grid.key((grid.index(band.keys)[:, None, :] - corner[None]).clamp(0, n - 2))))
    idx = cells[:, None, :] + corner[None]
    keys = grid.key(idx)
    rows = band.lookup(keys)
    far = torch.where(outside[keys], h, -h)
    values = torch.where(rows >= 0, band_value[rows.clamp_min(0)], far)
    return marching_cubes(cells, values, grid.position, lambda i, a: grid.key(i) * 3 + a)

"""Remeshing to a clean closed surface: flood fill around an unsigned-distance wall + marching cubes.

The decoded mesh is not a clean boundary: it is porous, carries sheets inside the object and its faces' winding
is not consistent (a sign taken from the closest feature's pseudo-normal, exact for a closed oriented input, put
thousands of bubbles and thin inner shells into decoded objects, and the decimation then collapsed those shells
into holes: the 50,000-face assets lost 0.06 of input-view IoU on 29 held-out objects). So no sign is read from
the input. At grid resolution R (spacing h = 1/R over the model cube, plus a margin):
1. The band of grid vertices within h of the input gets the exact unsigned distance d (`ClosestTriangleBand`).
2. The wall W = vertices with d < eps, eps = `WALL_CELLS` * h > h/2: every grid edge that crosses the input has
   an end in W. Every other vertex is outside if it is connected to the grid boundary without crossing W (flood
   fill), inside otherwise: holes narrower than ~2 eps are sealed and every cavity is filled.
3. Marching cubes of d - eps on the outside vertices and a negative value on the rest, over the cells that touch
   W (outside vertices beyond the band get their distance from their neighbours' closest triangles). Inside
   vertices next to outside ones are all in W, so the surface is the eps-level of d around the outside region:
   the boundary of a complete sign assignment (`marching_cubes`), closed, with no inner shells, lying eps outside
   the input (an open sheet becomes a closed slab 2 eps thick, which the decimation keeps).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .closest import ClosestTriangleBand, Grid, closest_on_triangles, triangle_point
from .marching_cubes import marching_cubes

_MARGIN = 2        # grid vertices beyond the model cube on each side, so the boundary is always outside


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
# The coarsest remesh grid: it seals holes narrower than ~1.5 / R and turns thinner sheets into slabs. At 50k faces
# a 192 grid leaves the decimation about (192 / 256)^2 = 0.56 of the faces a 256 one does, for the same assets
# (29 held-out objects, H200, 2026-11-22: IoU 0.893 vs 0.892, F@0.05 visible 0.659 vs 0.661; BENCHMARKS.md).
MIN_RESOLUTION = 192


def default_remesh_resolution(resolution: int, face_target: int, decoded_faces: int) -> int:
    """The grid R whose surface has about `DECIMATION_ROOM` x `face_target` triangles: a surface's triangle count
    grows as R^2, and the decoded mesh has `decoded_faces` at `resolution`. Rounded up to 64, at least
    `MIN_RESOLUTION`, never above the decoded resolution (finer grids would only re-sample the same surface)."""
    r = resolution * (DECIMATION_ROOM * face_target / max(decoded_faces, 1)) ** 0.5
    return int(min(max(MIN_RESOLUTION, 64 * math.ceil(r / 64)), resolution))


# The wall the flood fill cannot cross: grid vertices closer than this many cells to the input. Above 1/2 so that
# the fill cannot leak through the surface; 0.75 leaves margin, and slabs 1.5 cells thick survive the decimation
# (at 0.55 thin parts still lost volume to it; measured on held-out objects, BENCHMARKS.md).
WALL_CELLS = 0.75


def remesh(vertices: torch.Tensor, faces: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed surface around the input at grid resolution `resolution` (model frame, cube
    [-0.5, 0.5]^3), `WALL_CELLS` / `resolution` outside it; see the module doc."""
    vertices = vertices.float()
    h = 1.0 / resolution
    eps = WALL_CELLS * h
    grid = Grid(origin=-0.5 - _MARGIN * h, spacing=h, dims=resolution + 1 + 2 * _MARGIN)
    band = ClosestTriangleBand.build(vertices, faces, grid, radius=h)
    n = grid.dims
    near = band.distance < eps
    wall_keys = band.keys[near]
    wall = torch.zeros(n * n * n, dtype=torch.bool, device=vertices.device)
    wall[wall_keys] = True
    outside = flood_outside(wall.view(n, n, n)).reshape(-1)
    # inside band vertices get a small negative value even at d >= eps (a filled cavity's band)
    band_value = torch.where(outside[band.keys], band.distance - eps, (band.distance - eps).clamp_max(-1e-3 * h))

    corner = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], device=vertices.device)
    cells = grid.index(torch.unique(grid.key((grid.index(wall_keys)[:, None, :] - corner[None]).clamp(0, n - 2))))
    keys = grid.key(cells[:, None, :] + corner[None])
    rows = band.lookup(keys)
    values = torch.where(rows >= 0, band_value[rows.clamp_min(0)], torch.where(outside[keys], h, -h))
    # An outside corner beyond the band (d > h) that shares a cube edge with a wall corner needs its own d - eps,
    # not a clamped h, or the crossing on that edge moves by up to ~0.3 cell and the surface gets terraced:
    # its distance to the closest triangles of its 6 neighbours (the wall one among them).
    beyond = (rows < 0) & outside[keys]
    far_keys, inverse = torch.unique(keys[beyond], return_inverse=True)
    values[beyond] = (_distance_via_neighbours(vertices, faces, band, far_keys) - eps)[inverse]
    return marching_cubes(cells, values, grid.position, lambda i, a: grid.key(i) * 3 + a)


_NEIGHBOURS = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def _distance_via_neighbours(vertices: torch.Tensor, faces: torch.Tensor, band: ClosestTriangleBand,
                             keys: torch.Tensor) -> torch.Tensor:
    """Distance [K] from grid vertices `keys` (outside the band) to the closest of their 6 neighbours' closest
    triangles; the band radius where no neighbour is in the band."""
    grid = band.grid
    idx = grid.index(keys)
    neighbours = (idx[:, None, :] + _NEIGHBOURS.to(idx.device)).clamp(0, grid.dims - 1)
    rows = band.lookup(grid.key(neighbours))                                    # [K, 6]
    tri = vertices[faces[band.triangle[rows.clamp_min(0)]]]                     # [K, 6, 3, 3]
    p = grid.position(idx)[:, None, :].expand(-1, 6, -1)
    a, b, c = tri.unbind(-2)
    closest = triangle_point(closest_on_triangles(p, a, b, c), a, b, c)
    d = torch.where(rows >= 0, (p - closest).norm(dim=-1), torch.full_like(p[..., 0], float("inf"))).amin(1)
    return torch.where(torch.isfinite(d), d, torch.full_like(d, grid.spacing))

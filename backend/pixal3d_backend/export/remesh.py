"""Remeshing to a clean closed surface: a wall from the decoded voxels and the mesh, flood fill, marching cubes.

Decodes of a weak model are porous: many intersection flags are missing, so the raw mesh has holes everywhere,
and its orientation (recovered from crossing parity along lattice lines) is wrong along every line that passes
a hole. The solid is therefore built from topology, not from the raw mesh's normals. At grid resolution R
(spacing h = 1/R; grid vertices at the cell centres of the model cube, plus a margin):
1. The wall W = grid vertices within h of the input surface (`ClosestTriangleBand`) plus, when given, the
   vertices of the decoded voxels: the voxel band is closed where the mesh has holes. Any grid edge that
   crosses the surface has an end within h/2 of it, so the mesh band alone already walls in a closed input.
2. Grid vertices connected to the grid boundary without crossing W are outside (flood fill); the other free
   vertices are enclosed, i.e. inside.
3. A wall vertex is inside when it is at least as close (in 6-neighbour steps through W) to an enclosed vertex
   as to an outside one: the sign flips at the middle of the wall, which is the input surface for the
   symmetric band of step 1. A wall with no enclosed vertex within `_SHEET_STEPS` is an open sheet (the
   enclosure leaks through holes wider than the wall) and is kept whole as a thin closed slab.
4. Field value = sign * distance to the input surface (capped at h): marching cubes then puts the vertices on
   the input surface wherever the sign flips next to it, and at the middle of the wall across its holes.
Marching cubes runs over the cells that touch W; every sign change is there (two adjacent non-wall vertices are
in the same flood region), so the result is the closed 2-manifold boundary of a complete sign assignment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .closest import ClosestTriangleBand, Grid
from .marching_cubes import marching_cubes

_MARGIN = 2        # grid vertices beyond the model cube on each side, so the boundary is always outside
# Decoded voxel bands are 1..3 voxels thick and the mesh band 2 vertices: a wall vertex this many steps from any
# enclosed vertex is beyond any closed shell, i.e. on an open sheet.
_SHEET_STEPS = 8
_NEIGHBOURS = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


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
    count = int(out.sum())
    while True:
        for _ in range(2):
            out = _dilate(out) & free
        new = int(out.sum())
        if new == count:
            return out
        count = new


def _steps_through_wall(neighbour: torch.Tensor, start: torch.Tensor, limit: int) -> torch.Tensor:
    """Per wall vertex, the number of 6-neighbour steps (1 = adjacent) from the vertices flagged in `start`
    through the wall, `limit + 1` beyond `limit`. neighbour [W, 6]: wall row of each neighbour, W where it is not
    a wall vertex; start [W, 6] bool: that neighbour is a start vertex."""
    far = limit + 1
    steps = torch.where(start.any(1), 1, far)
    for _ in range(limit - 1):
        padded = torch.cat([steps, steps.new_full((1,), far)])
        steps = torch.minimum(steps, padded[neighbour].amin(1) + 1).clamp_max(far)
    return steps


def default_remesh_resolution(resolution: int, face_target: int) -> int:
    """A marching-cubes surface at grid R has roughly 2..6 R^2 triangles for an object filling the cube, so
    R = sqrt(face_target) (rounded up to 64, at least 256) leaves the quadric decimation room to place the
    faces, and never exceeds the decoded resolution (finer grids would only re-sample the same surface)."""
    r = max(256, 64 * -(-int(face_target ** 0.5) // 64))
    return int(min(r, resolution))


def remesh(vertices: torch.Tensor, faces: torch.Tensor, resolution: int,
           voxel_coords: torch.Tensor | None = None, voxel_resolution: int | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed 2-manifold surface of the input at grid resolution `resolution` (model frame, cube [-0.5, 0.5]^3).

    voxel_coords int [N, 3] at `voxel_resolution`: the decoded voxels around the surface, which close the
    wall where the mesh is porous (see the module docstring).
    """
    vertices = vertices.float()
    dev = vertices.device
    h = 1.0 / resolution
    grid = Grid(origin=-0.5 + (0.5 - _MARGIN) * h, spacing=h, dims=resolution + 2 * _MARGIN)
    n = grid.dims
    band = ClosestTriangleBand.build(vertices, faces, grid, radius=h)
    wall_keys = band.keys
    if voxel_coords is not None:
        # each voxel centre to its nearest grid vertex (the same vertex when the resolutions match)
        idx = torch.round((voxel_coords.to(dev).float() + 0.5) * (resolution / voxel_resolution) - 0.5).long()
        wall_keys = torch.unique(torch.cat([wall_keys, grid.key(idx.clamp(0, resolution - 1) + _MARGIN)]))
    wall_idx = grid.index(wall_keys)

    # Flood fill inside the wall's bounding box grown by one vertex: its boundary is outside.
    lo = (wall_idx.amin(0) - 1).clamp_min(0)
    box = (wall_idx.amax(0) + 2).clamp_max(n) - lo
    local = wall_idx - lo
    wall = torch.zeros(box.tolist(), dtype=torch.bool, device=dev)
    wall[local[:, 0], local[:, 1], local[:, 2]] = True
    outside_box = flood_outside(wall)

    def rows(idx: torch.Tensor) -> torch.Tensor:
        """Row of each grid vertex [..., 3] in the wall, or -1."""
        keys = grid.key(idx)
        pos = torch.searchsorted(wall_keys, keys).clamp(max=wall_keys.numel() - 1)
        return torch.where(wall_keys[pos] == keys, pos, -1)

    def outside(idx: torch.Tensor) -> torch.Tensor:
        """Whether free grid vertices [..., 3] were reached by the flood (everything off the box is)."""
        rel = idx - lo
        in_box = ((rel >= 0) & (rel < box)).all(-1)
        rel = torch.minimum(rel.clamp_min(0), box - 1)
        return ~in_box | outside_box[rel[..., 0], rel[..., 1], rel[..., 2]]

    around = wall_idx[:, None, :] + _NEIGHBOURS.to(dev)                          # [W, 6, 3], never off the grid
    neighbour = rows(around)
    free_outside = outside(around)
    neighbour_row = torch.where(neighbour >= 0, neighbour, wall_keys.numel())
    to_outside = _steps_through_wall(neighbour_row, (neighbour < 0) & free_outside, _SHEET_STEPS)
    to_enclosed = _steps_through_wall(neighbour_row, (neighbour < 0) & ~free_outside, _SHEET_STEPS)
    wall_inside = (to_enclosed <= to_outside) | (to_enclosed > _SHEET_STEPS)

    distance = torch.full((wall_keys.numel(),), h, device=dev)
    in_band = rows(grid.index(band.keys))
    distance[in_band] = band.distance
    wall_value = torch.where(wall_inside, -distance.clamp_min(1e-6 * h), distance)

    corner = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], device=dev)
    cells = grid.index(torch.unique(grid.key((wall_idx[:, None, :] - corner[None]).clamp(0, n - 2))))
    idx = cells[:, None, :] + corner[None]
    r = rows(idx)
    far = torch.where(outside(idx), h, -h)
    values = torch.where(r >= 0, wall_value[r.clamp_min(0)], far)
    return marching_cubes(cells, values, grid.position, lambda i, a: grid.key(i) * 3 + a)

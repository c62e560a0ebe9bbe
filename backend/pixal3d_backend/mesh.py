"""Meshing of decoded voxels (flexible dual grid) and small-hole filling, in vectorised PyTorch (CPU or GPU).

Flexible dual grid (TRELLIS.2 `o_voxel.convert.flexible_dual_grid_to_mesh`): every voxel owns one dual vertex
placed inside (or slightly around) it; every voxel edge flagged as crossing the surface becomes a quad joining
the dual vertices of the 4 voxels around that edge, split into two triangles along the better diagonal.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .sparse_conv import CoordinateIndex

# For an edge along axis a starting at voxel c, the 4 voxels around it are c + QUAD_OFFSETS[a] (in winding order).
QUAD_OFFSETS = torch.tensor([
    [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]],   # x
    [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],   # y
    [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]],   # z
])
# the two triangulations of quad (0, 1, 2, 3): along diagonal 0-2, or along diagonal 1-3
_SPLIT_02 = torch.tensor([0, 1, 2, 0, 2, 3])
_SPLIT_13 = torch.tensor([0, 1, 3, 3, 1, 2])


@dataclass
class VoxelMesh:
    """A mesh plus the voxels it was extracted from (what the exporter bakes attributes from).

    vertices float32 [V, 3] and faces int32 [F, 3] live in the box [origin, origin + resolution * voxel_size];
    coords int32 [N, 3] are the voxel (x, y, z) indices; attrs [N, C] their per-voxel attributes (PBR) or None.
    """
    vertices: torch.Tensor
    faces: torch.Tensor
    coords: torch.Tensor
    attrs: torch.Tensor | None
    voxel_size: float
    origin: tuple[float, float, float] = (-0.5, -0.5, -0.5)


def flexible_dual_grid_to_mesh(coords: torch.Tensor, vertex_offsets: torch.Tensor, intersected: torch.Tensor,
                               split_weights: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesh of one object from its decoded voxels.

    coords int [N, 3] (unique, in [0, resolution)); vertex_offsets float [N, 3] (dual vertex inside voxel, in
    voxel units); intersected bool [N, 3] (the voxel's edge along x / y / z crosses the surface);
    split_weights float [N] or [N, 1] (> 0). Returns vertices float32 [N, 3] in [-0.5, 0.5]^3 (one per voxel,
    in voxel order, unused ones included) and faces int32 [F, 3], two per quad, quads in voxel-major then
    axis order. A quad is kept only if all 4 voxels exist.
    """
    device = coords.device
    vertices = (coords.float() + vertex_offsets.float()) * (1.0 / resolution) - 0.5

    voxel, axis = intersected.nonzero(as_tuple=True)
    corners = coords[voxel].long().unsqueeze(1) + QUAD_OFFSETS.to(device)[axis]          # [M, 4, 3]
    index = CoordinateIndex(coords)
    outside = (corners >= resolution).any(-1)          # the official hash map has no cells past the grid
    quads = torch.where(outside, -1, index.find(corners.reshape(-1, 3)).reshape(-1, 4))
    quads = quads[(quads >= 0).all(-1)].long()
    del corners

    w = split_weights.reshape(-1)[quads]
    along_02 = (w[:, 0] * w[:, 2] > w[:, 1] * w[:, 3]).unsqueeze(1)
    faces = torch.where(along_02, quads[:, _SPLIT_02.to(device)], quads[:, _SPLIT_13.to(device)])
    return vertices, faces.reshape(-1, 3).int()


def orient_outward(mesh: VoxelMesh) -> VoxelMesh:
    """The same mesh with every face wound outward (counter-clockwise seen from outside).

    The official mesher winds each quad by its axis alone (its normal always points along -axis), so on a closed
    surface about half the faces point inward. Which way a quad should face follows from parity: along any lattice
    line the surface is crossed an even number of times, entering the object at the 1st, 3rd, ... crossing and
    leaving it at the 2nd, 4th, ... A quad whose primal edge leaves the object (inside at its lower end) must face
    +axis and is flipped. The primal edge of a face is recovered from its voxels (one mesh vertex per voxel): the
    three share their coordinate along the quad's axis `a`, and their minimum in the two other axes is the flagged
    voxel `c`, whose edge runs from `c_a` to `c_a + 1` on the lattice line through `c + 1` in those axes.
    Meshes that are not closed along a line get that line's crossings paired in order, the best guess there.
    """
    faces = mesh.faces.long()
    if faces.numel() == 0:
        return mesh
    corners = mesh.coords.long()[faces]                                   # [F, 3 vertices, 3 axes]
    lo, hi = corners.min(1).values, corners.max(1).values
    axis = (lo == hi).long().argmax(1)                                     # the axis the quad's voxels share
    other = torch.stack([(axis + 1) % 3, (axis + 2) % 3], 1)
    line = lo.gather(1, other) + 1                                         # lattice line of the primal edge
    position = lo.gather(1, axis[:, None]).squeeze(1)
    size = int(mesh.coords.max()) + 3
    line_key = (axis * size + line[:, 0]) * size + line[:, 1]
    edge_key = line_key * size + position
    edges, face_edge = torch.unique(edge_key, return_inverse=True)         # sorted: by line, then position
    edge_line = edges // size
    first = torch.searchsorted(edge_line, edge_line)                       # index of each line's first crossing
    leaves = (torch.arange(len(edges), device=edges.device) - first) % 2 == 1
    flip = leaves[face_edge]
    oriented = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces).to(mesh.faces.dtype)
    return dataclasses.replace(mesh, faces=oriented)


def _component_labels(num_nodes: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Long [num_nodes]: the smallest node id of each node's connected component in the graph of edges (u, v).
    Min-label hooking with pointer jumping: O(log n) rounds on typical graphs, each fully vectorised."""
    label = torch.arange(num_nodes, device=u.device)
    while True:
        m = torch.minimum(label[u], label[v])
        new = label.scatter_reduce(0, u, m, "amin").scatter_reduce(0, v, m, "amin")
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new


def fill_small_holes(vertices: torch.Tensor, faces: torch.Tensor,
                     max_hole_perimeter: float = 3e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Closes every boundary loop whose perimeter is below `max_hole_perimeter` with a fan of triangles around
    a new vertex at the loop's centroid. Returns (vertices [V + holes, 3], faces [F + loop edges, 3]).

    Boundary edges are the (undirected) edges used by exactly one face. Only simple loops are filled: a loop
    through a vertex with more than two boundary edges (a pinch) is left open. Each new triangle (b, a, c)
    runs its boundary edge opposite to the face it borders (a -> b), so the fill is oriented like its
    neighbours; the undirected test means meshes with inconsistent orientation (raw FDG) are handled too.
    """
    n_vertices = vertices.shape[0]
    src = faces.long().reshape(-1)
    dst = faces.long()[:, [1, 2, 0]].reshape(-1)
    edge_keys = torch.minimum(src, dst) * n_vertices + torch.maximum(src, dst)
    _, inverse, counts = torch.unique(edge_keys, return_inverse=True, return_counts=True)
    on_boundary = counts[inverse] == 1
    a, b = src[on_boundary], dst[on_boundary]           # boundary half-edges, as their face runs them
    if a.numel() == 0:
        return vertices, faces

    loop = _component_labels(n_vertices, a, b)[a]      # loop id (smallest vertex id) of each boundary edge
    degree = torch.bincount(torch.cat([a, b]), minlength=n_vertices)
    pinched = torch.zeros(n_vertices, dtype=torch.bool, device=a.device)
    pinched.index_fill_(0, loop[(degree[a] != 2) | (degree[b] != 2)], True)
    perimeter = torch.zeros(n_vertices, dtype=vertices.dtype, device=vertices.device)
    perimeter.index_add_(0, loop, (vertices[b] - vertices[a]).norm(dim=-1))
    fill = ~pinched[loop] & (perimeter[loop] < max_hole_perimeter)
    if not fill.any():
        return vertices, faces

    a, b, loop = a[fill], b[fill], loop[fill]
    loop_ids, hole = torch.unique(loop, return_inverse=True)     # hole index 0..H-1 of each edge
    centroid = torch.zeros(loop_ids.numel(), 3, dtype=vertices.dtype, device=vertices.device)
    centroid.index_add_(0, hole, vertices[a] + vertices[b])     # every loop vertex ends exactly two edges
    centroid /= 2 * torch.bincount(hole).unsqueeze(1).to(vertices.dtype)
    new_faces = torch.stack([b, a, n_vertices + hole], dim=1).to(faces.dtype)
    return torch.cat([vertices, centroid]), torch.cat([faces, new_faces])

"""Training targets in the official representations, computed from a posed procedural object.

* Sparse-structure occupancy at `R_ss`: voxel occupied iff the surface passes within half a voxel diagonal
  of its centre (`|sdf(centre)| <= sqrt(3)/2 / R_ss`), which for a 1-Lipschitz field is every voxel the
  surface passes through.
* Flexible dual grid at `R` (spec §4.3, §6.1; o_voxel `mesh_to_flexible_dual_grid`): voxel `c` spans
  `[c, c+1]` in grid units. `intersected[c, a]` flags the primal edge along axis `a` at the voxel's *max*
  corner in the two other axes, i.e. from lattice point `c + 1 - e_a` to `c + 1` — exactly the edge shared by
  the four voxels `c + o` of the quad table (x: (0,0,0),(0,0,1),(0,1,1),(0,1,0); ...). An edge is
  intersected when the field changes sign between its end points. The voxel set is every voxel around an
  intersected edge, so every flagged quad has its four voxels. The dual vertex minimises the QEF of the
  Hermite data (edge crossing points and normals) on the voxel's 12 edges, regularised towards their mass
  point, as o_voxel does; it is stored as `offset = vertex - c` in voxel units, clamped to (-0.5, 1.5).
* Split weights: per quad the diagonal whose midpoint lies closer to the surface is preferred; the per-voxel
  weights `w` are fitted so that `w0 w2 > w1 w3` picks it (the official triangulation rule).
* PBR attributes `[N,6]` at each voxel centre projected onto the surface (base_color, metallic, roughness,
  alpha; spec §4.4).

Note on orientation: the official quad winding is fixed per axis (its normal points along -axis whatever
the crossing direction), so the raw FDG mesh is watertight but not consistently oriented; the intersected
flags carry no sign. `edge_inside_first` records, per flagged edge, whether the edge starts inside, which is
what a mesher needs to orient each quad outwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mesh import flexible_dual_grid_to_mesh
from .grid import lattice_points, project_to_surface, surface_voxels, voxel_centers
from .shapes import ObjectField
from .views import View

Tensor = torch.Tensor

# Corner k of a voxel is at offset (k & 1, k >> 1 & 1, k >> 2 & 1).
CORNERS = torch.tensor([[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)])
# The 12 voxel edges as (corner at the start, corner at the end); edge 4a+j runs along axis a.
EDGES = torch.tensor([[k, k | (1 << a)] for a in range(3) for k in range(8) if not k & (1 << a)])
# The flagged ("own") edge of each axis: the one ending at the max corner 7.
OWN_EDGE = torch.tensor([4 * a + 3 for a in range(3)])
# Official quad table (o_voxel `edge_neighbor_voxel_offset`): voxels around the edge flagged at voxel c.
QUAD_OFFSETS = torch.tensor([
    [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]],
    [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],
    [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]],
])
OFFSET_LIMIT = 0.5 - 1e-3            # offsets live in (-0.5, 1.5): 2 sigmoid(x) - 0.5
QEF_REGULARISATION = 0.1             # o_voxel's default regularization_weight


class PosedObject:
    """An `ObjectField` seen in the model frame of a view: `v = scale * R @ x + t` (distances scale too)."""

    def __init__(self, field: ObjectField, view: View):
        self.field, self.device = field, field.device
        self.rotation = torch.tensor(view.rotation, dtype=torch.float32, device=self.device)
        self.translation = torch.tensor(view.translation, dtype=torch.float32, device=self.device)
        self.scale = view.scale

    def _to_object(self, v: Tensor) -> Tensor:
        return ((v - self.translation) @ self.rotation) / self.scale

    def sdf(self, v: Tensor) -> Tensor:
        return self.field.sdf(self._to_object(v)) * self.scale

    def normals(self, v: Tensor) -> Tensor:
        return self.field.normals(self._to_object(v)) @ self.rotation.T

    def attributes(self, v: Tensor) -> Tensor:
        x = self._to_object(v)
        _, part = self.field.sdf_and_part(x)
        return self.field.attributes(x, part).clamp(0.0, 1.0)


@dataclass
class ShapeTargets:
    """Flexible-dual-grid targets of one posed object at `resolution` (coords in x-major order)."""
    resolution: int
    coords: Tensor            # [N,3] int32 voxel coords (x, y, z)
    offsets: Tensor           # [N,3] dual vertex - coords, voxel units, in (-0.5, 1.5)
    intersected: Tensor       # [N,3] bool, edge along each axis at the voxel's max corner
    edge_inside_first: Tensor  # [N,3] bool, that edge starts inside the object (meaningful where intersected)
    split_weight: Tensor      # [N] positive
    attributes: Tensor        # [N,6] base_color, metallic, roughness, alpha in [0,1]

    @property
    def dual_vertices(self) -> Tensor:
        """Dual vertices in the model frame (spec §6.1: `(c + offset) / R - 0.5`)."""
        return (self.coords.float() + self.offsets) / self.resolution - 0.5

    def decoder_logits(self) -> Tensor:
        """`[N,7]` pre-activation values that the shape decoder's output activations map to these targets:
        `offset = 2 sigmoid(h) - 0.5`, `intersected = h > 0`, `split_w = softplus(h)` (spec §4.3)."""
        offset_logit = torch.logit((self.offsets + 0.5) / 2.0)
        flag_logit = self.intersected.float() * 2.0 - 1.0
        w = self.split_weight.clamp(min=1e-4)
        split_logit = w + torch.log(-torch.expm1(-w))           # softplus^-1, stable for large w
        return torch.cat([offset_logit, flag_logit, split_logit[:, None]], dim=1)


def occupancy(posed: PosedObject, resolution: int) -> Tensor:
    """Dense `[R,R,R]` bool sparse-structure occupancy (dims x, y, z)."""
    coords = surface_voxels(posed.sdf, resolution, posed.device)
    grid = torch.zeros(resolution, resolution, resolution, dtype=torch.bool, device=posed.device)
    grid[coords[:, 0], coords[:, 1], coords[:, 2]] = True
    return grid


def _keys(coords: Tensor, size: int) -> Tensor:
    """x-major linear index of integer coords in a `size`^3 block (sorting keys sorts coords x-major)."""
    return (coords[:, 0] * size + coords[:, 1]) * size + coords[:, 2]


def _from_keys(keys: Tensor, size: int) -> Tensor:
    return torch.stack([keys // (size * size), keys // size % size, keys % size], dim=1)


def _corner_values(posed: PosedObject, coords: Tensor, resolution: int) -> Tensor:
    """`[N,8]` field values at the voxels' lattice corners, each lattice point evaluated once. Lattice points
    on the cube's boundary count as outside, so the surface inside the grid is always closed."""
    corners = (coords[:, None, :] + CORNERS.to(coords.device)).reshape(-1, 3)
    unique, inverse = torch.unique(_keys(corners, resolution + 1), return_inverse=True)
    lattice = _from_keys(unique, resolution + 1)
    values = posed.sdf(lattice_points(lattice, resolution))
    on_boundary = ((lattice == 0) | (lattice == resolution)).any(dim=1)
    values = torch.where(on_boundary, values.abs().clamp(min=1e-6), values)
    return values[inverse].reshape(-1, 8)


def _own_flags(values: Tensor) -> tuple[Tensor, Tensor]:
    inside = values < 0
    start, end = EDGES[OWN_EDGE].to(values.device).unbind(1)
    return inside[:, start] != inside[:, end], inside[:, start]


def _fdg_voxels(posed: PosedObject, resolution: int) -> Tensor:
    """Voxels around every intersected edge: the band's flagged edges, closed under 'flagged edges of
    members add their quad voxels' (a no-op for 1-Lipschitz fields; it guards the ellipsoid bound)."""
    coords = surface_voxels(posed.sdf, resolution, posed.device)
    offsets = QUAD_OFFSETS.to(coords.device)
    members = torch.empty(0, 3, dtype=coords.dtype, device=coords.device)
    while True:
        flags, _ = _own_flags(_corner_values(posed, coords, resolution))
        owner, axis = flags.nonzero(as_tuple=True)
        quads = (coords[owner][:, None, :] + offsets[axis]).reshape(-1, 3)
        quads = quads[((quads >= 0) & (quads < resolution)).all(dim=1)]
        grown = _from_keys(torch.unique(_keys(torch.cat([members, quads]), resolution)), resolution)
        if len(grown) == len(members):
            return members
        members, coords = grown, grown


def _hermite_vertices(posed: PosedObject, coords: Tensor, values: Tensor, resolution: int) -> Tensor:
    """QEF dual vertices `[N,3]` in voxel units relative to each voxel's min corner."""
    edges = EDGES.to(coords.device)
    corner = CORNERS.to(coords.device).float()
    f0, f1 = values[:, edges[:, 0]], values[:, edges[:, 1]]                    # [N,12]
    voxel, edge = ((f0 < 0) != (f1 < 0)).nonzero(as_tuple=True)
    a, b = corner[edges[edge, 0]], corner[edges[edge, 1]]                     # local, voxel units
    fa, fb = f0[voxel, edge], f1[voxel, edge]
    origin = coords[voxel].float()
    for _ in range(3):    # regula falsi on the true field along the edge
        t = (fa / (fa - fb)).clamp(0.0, 1.0)[:, None]
        p = a + t * (b - a)
        fp = posed.sdf(lattice_points(origin + p, resolution))
        same = (fp < 0) == (fa < 0)
        a, fa = torch.where(same[:, None], p, a), torch.where(same, fp, fa)
        b, fb = torch.where(same[:, None], b, p), torch.where(same, fb, fp)
    t = (fa / (fa - fb)).clamp(0.0, 1.0)[:, None]
    points = a + t * (b - a)
    normals = posed.normals(lattice_points(origin + points, resolution))
    n = len(coords)
    outer = normals[:, :, None] * normals[:, None, :]
    A = torch.zeros(n, 3, 3, device=coords.device).index_add_(0, voxel, outer)
    rhs = torch.zeros(n, 3, device=coords.device).index_add_(0, voxel, normals * (normals * points).sum(-1, True))
    count = torch.zeros(n, device=coords.device).index_add_(0, voxel, torch.ones_like(voxel, dtype=torch.float32))
    mass = torch.zeros(n, 3, device=coords.device).index_add_(0, voxel, points) / count[:, None].clamp(min=1)
    reg = QEF_REGULARISATION * count[:, None].clamp(min=1)
    eye = torch.eye(3, device=coords.device)
    vertex = torch.linalg.solve(A + reg[..., None] * eye, rhs + reg * mass)
    return vertex.clamp(-OFFSET_LIMIT, 1.0 + OFFSET_LIMIT)


def _quads(coords: Tensor, intersected: Tensor, resolution: int) -> Tensor:
    """`[Q,4]` voxel indices of every flagged quad (all four voxels exist by construction)."""
    keys = _keys(coords.long(), resolution)
    owner, axis = intersected.nonzero(as_tuple=True)
    corners = coords[owner].long()[:, None, :] + QUAD_OFFSETS.to(coords.device)[axis]
    return torch.searchsorted(keys, _keys(corners.reshape(-1, 3), resolution)).reshape(-1, 4)


def _fit_split_weights(posed: PosedObject, vertices: Tensor, quads: Tensor, steps: int = 100) -> Tensor:
    """Per-voxel split weights whose products pick, per quad, the diagonal with its midpoint nearer the
    surface: a logistic fit of u = log w with `sign(u0 + u2 - u1 - u3)` as the label."""
    q = vertices[quads]
    diag02 = posed.sdf((q[:, 0] + q[:, 2]) / 2).abs()
    diag13 = posed.sdf((q[:, 1] + q[:, 3]) / 2).abs()
    label = torch.where(diag02 <= diag13, 1.0, -1.0)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], device=vertices.device)
    u = torch.zeros(len(vertices), device=vertices.device)
    degree = torch.zeros_like(u).index_add_(0, quads.reshape(-1), torch.ones(quads.numel(), device=u.device))
    for _ in range(steps):
        margin = label * (u[quads] * sign).sum(-1)
        g = -label * torch.sigmoid(-margin)                                  # d softplus(-margin) / d score
        grad = torch.zeros_like(u).index_add_(0, quads.reshape(-1), (g[:, None] * sign).reshape(-1))
        u = u - (grad / degree.clamp(min=1.0) + 1e-2 * u)
    return torch.exp(u.clamp(-6.0, 6.0))


def shape_targets(posed: PosedObject, resolution: int) -> ShapeTargets:
    coords = _fdg_voxels(posed, resolution)
    values = _corner_values(posed, coords, resolution)
    intersected, inside_first = _own_flags(values)
    offsets = _hermite_vertices(posed, coords, values, resolution)
    dual = (coords.float() + offsets) / resolution - 0.5
    quads = _quads(coords, intersected, resolution)
    split_weight = _fit_split_weights(posed, dual, quads)
    centres = voxel_centers(coords, resolution)
    attributes = posed.attributes(project_to_surface(posed.sdf, posed.normals, centres, steps=2))
    return ShapeTargets(resolution, coords.int(), offsets, intersected, inside_first, split_weight, attributes)


def reconstruct_mesh_from_targets(targets: ShapeTargets) -> tuple[Tensor, Tensor]:
    """Mesh `(vertices [V,3], faces [F,3])` of the targets through the product's own FDG mesher, so the
    targets are checked against exactly what the decoder output goes through."""
    return flexible_dual_grid_to_mesh(targets.coords, targets.offsets, targets.intersected, targets.split_weight,
                                      targets.resolution)

"""Flexible-dual-grid meshing and small-hole filling (no fixture covers hole filling: properties only)."""
import torch

from pixal3d_backend.mesh import VoxelMesh, fill_small_holes, flexible_dual_grid_to_mesh, orient_outward


def _undirected_edge_counts(faces):
    f = faces.long()
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(dim=1).values
    return torch.unique(e, dim=0, return_counts=True)[1]


def _is_closed_and_oriented(faces):
    """Every directed edge appears once and its reverse appears once."""
    f = faces.long()
    directed = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    forward = set(map(tuple, directed.tolist()))
    return len(forward) == len(directed) and all((b, a) in forward for a, b in forward)


def _all_voxels_and_flags(inside):
    """Every voxel of the grid whose corners are the points of `inside` [R+1]^3, and its edge flags: the edge of
    voxel c along axis a runs between grid points c + 1 - e_a and c + 1 and is flagged on a sign change."""
    res = inside.shape[0] - 1
    coords = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    hi = coords + 1
    flags = []
    for axis in range(3):
        lo = hi.clone()
        lo[:, axis] -= 1
        flags.append(inside[tuple(lo.T)] != inside[tuple(hi.T)])
    return coords, torch.stack(flags, 1)


def _sphere_voxels(res=24, radius=0.3):
    """Voxels and edge flags of a sphere SDF sampled at the grid points (voxel corners).

    The edge of voxel c along axis a runs between grid points c + 1 - e_a and c + 1 (the corner shared by the
    4 voxels of its quad); it is flagged when the SDF changes sign along it."""
    g = torch.arange(res + 1, dtype=torch.float32) / res - 0.5
    sdf = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).norm(dim=-1) - radius
    coords, flags = _all_voxels_and_flags(sdf < 0)
    # keep every voxel touching a crossing edge: all 4 voxels of each quad exist
    keep = torch.zeros(res, res, res, dtype=torch.bool)
    quad = torch.tensor([[[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]], [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],
                         [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]]])
    v, a = flags.nonzero(as_tuple=True)
    corners = (coords[v].unsqueeze(1) + quad[a]).reshape(-1, 3)
    keep[tuple(corners.T)] = True
    keep = keep.reshape(-1)
    return coords[keep], flags[keep]


def test_fdg_sphere_is_closed_two_manifold_genus_zero():
    coords, flags = _sphere_voxels()
    n = coords.shape[0]
    torch.manual_seed(0)
    vertices, faces = flexible_dual_grid_to_mesh(coords, torch.full((n, 3), 0.5), flags, torch.rand(n) + 0.1, 24)
    assert vertices.shape == (n, 3) and vertices.dtype == torch.float32
    assert faces.shape == (2 * int(flags.sum()), 3)          # every crossing edge became a quad
    assert bool((_undirected_edge_counts(faces) == 2).all())   # closed, every edge shared by two triangles
    used = torch.unique(faces).numel()
    n_edges = 3 * faces.shape[0] // 2
    assert used - n_edges + faces.shape[0] == 2                 # Euler characteristic of a sphere
    r = (vertices[torch.unique(faces).long()]).norm(dim=-1)    # dual vertices at voxel centres near the sphere
    assert float((r - 0.3).abs().max()) < 1.0 / 24


def test_fdg_vertex_formula_split_rule_and_missing_neighbours():
    coords = torch.tensor([[1, 1, 1], [1, 1, 2], [1, 2, 2], [1, 2, 1], [5, 5, 5]])
    offsets = torch.rand(5, 3)
    flags = torch.zeros(5, 3, dtype=torch.bool)
    flags[0, 0] = True      # x-edge of voxel 0: quad (0, 1, 2, 3)
    flags[4, 1] = True      # y-edge of the isolated voxel: its neighbours are missing -> no quad
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])
    vertices, faces = flexible_dual_grid_to_mesh(coords, offsets, flags, w, 8)
    torch.testing.assert_close(vertices, (coords + offsets) / 8 - 0.5)
    assert faces.tolist() == [[0, 1, 3], [3, 1, 2]]             # w0*w2 = 1 < w1*w3 = 3: split along 1-3
    w[0] = 4.0
    _, faces = flexible_dual_grid_to_mesh(coords, offsets, flags, w, 8)
    assert faces.tolist() == [[0, 1, 2], [0, 2, 3]]


def _octasphere(subdivisions=2):
    """A closed, outward-oriented triangulated unit sphere."""
    v = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float32)
    f = [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
    verts = v.tolist()
    for _ in range(subdivisions):
        mid, new_f = {}, []

        def midpoint(i, j):
            key = (min(i, j), max(i, j))
            if key not in mid:
                mid[key] = len(verts)
                verts.append([(a + b) / 2 for a, b in zip(verts[i], verts[j])])
            return mid[key]
        for a, b, c in f:
            ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
            new_f += [[a, ab, ca], [ab, b, bc], [ca, bc, c], [ab, bc, ca]]
        f = new_f
    verts = torch.tensor(verts)
    return verts / verts.norm(dim=-1, keepdim=True), torch.tensor(f, dtype=torch.int32)


def _perimeter(vertices, loop):
    p = vertices[loop]
    return float((p - p.roll(1, 0)).norm(dim=-1).sum())


def test_sphere_fixture_is_closed_and_oriented():
    v, f = _octasphere()
    assert _is_closed_and_oriented(f)
    assert float(torch.linalg.det(v[f.long()]).sum()) > 0     # outward: positive signed volume


def test_small_hole_is_filled_consistently_and_big_hole_is_kept():
    v, f = _octasphere()
    small = f[0]                                                # one triangle -> a 3-edge hole
    big_center = int(f[-1, 0])                                  # all faces around a vertex -> an n-edge hole
    around = (f == big_center).any(1)
    around[0] = False
    keep = torch.ones(f.shape[0], dtype=torch.bool)
    keep[0] = False
    keep &= ~around
    holed = f[keep]
    small_perimeter = _perimeter(v, small.long())
    ring = torch.unique(f[around]).tolist()
    ring.remove(big_center)
    assert not _is_closed_and_oriented(holed)
    threshold = small_perimeter * 1.01
    v2, f2 = fill_small_holes(v, holed, max_hole_perimeter=threshold)
    assert v2.shape[0] == v.shape[0] + 1 and f2.shape[0] == holed.shape[0] + 3
    torch.testing.assert_close(v2[-1], v[small.long()].mean(0))
    assert f2.dtype == holed.dtype
    counts = _undirected_edge_counts(f2)
    assert int((counts == 1).sum()) == len(ring) and bool((counts <= 2).all())   # only the big hole is left
    # now also fill the big one: the result is closed and consistently oriented
    v3, f3 = fill_small_holes(v, holed, max_hole_perimeter=10.0)
    assert v3.shape[0] == v.shape[0] + 2 and f3.shape[0] == holed.shape[0] + 3 + len(ring)
    assert _is_closed_and_oriented(f3)
    assert float(torch.linalg.det(v3[f3.long()]).sum()) > 0


def test_closed_mesh_and_no_hole_below_threshold_are_untouched():
    v, f = _octasphere()
    assert fill_small_holes(v, f)[1] is f
    holed = f[1:]
    v2, f2 = fill_small_holes(v, holed, max_hole_perimeter=_perimeter(v, f[0].long()) * 0.99)
    assert v2.shape == v.shape and torch.equal(f2, holed)


def test_fills_holes_of_a_raw_fdg_mesh_with_inconsistent_orientation():
    coords, flags = _sphere_voxels(res=16, radius=0.3)
    n = coords.shape[0]
    v, f = flexible_dual_grid_to_mesh(coords, torch.full((n, 3), 0.5), flags, torch.ones(n), 16)
    holed = f[2:]                                               # drop one quad (two triangles)
    v2, f2 = fill_small_holes(v, holed, max_hole_perimeter=4.5 / 16)
    assert f2.shape[0] == holed.shape[0] + 4                   # a 4-edge hole -> a fan of 4
    assert bool((_undirected_edge_counts(f2) == 2).all())


def _signed_volume(vertices, faces):
    a, b, c = vertices[faces.long()].unbind(1)
    return float((a * torch.cross(b, c, dim=1)).sum() / 6)


def test_orient_outward_makes_a_torus_and_a_nested_shell_consistent():
    """Official winding is per axis (about half the faces point in); parity along lattice lines fixes it, also for
    a hollow object (a sphere inside a sphere) whose inner shell must face inward, towards the cavity."""
    res, torus_major, torus_minor = 32, 0.25, 0.1
    g = torch.arange(res + 1, dtype=torch.float32) / res - 0.5
    p = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1)
    torus = (torch.stack([p[..., :2].norm(dim=-1) - torus_major, p[..., 2]], -1).norm(dim=-1) - torus_minor)
    shell = torch.maximum(p.norm(dim=-1) - 0.4, 0.2 - p.norm(dim=-1))
    for sdf, volume in ((torus, 2 * torch.pi ** 2 * torus_major * torus_minor ** 2),
                        (shell, 4 / 3 * torch.pi * (0.4 ** 3 - 0.2 ** 3))):
        coords, flags = _all_voxels_and_flags(sdf < 0)
        n = coords.shape[0]                    # every voxel of the grid: each flagged quad has its 4 voxels
        vertices, faces = flexible_dual_grid_to_mesh(coords, torch.full((n, 3), 0.5), flags, torch.ones(n), res)
        raw = VoxelMesh(vertices, faces, coords.int(), None, 1 / res)
        assert not _is_closed_and_oriented(raw.faces)                    # the official winding is not consistent
        oriented = orient_outward(raw)
        assert _is_closed_and_oriented(oriented.faces)
        assert torch.equal(oriented.faces.sort(1).values, raw.faces.sort(1).values)   # same triangles
        assert abs(_signed_volume(vertices, oriented.faces) - volume) < 0.1 * volume

"""The chart unwrap (`export/charts.py`, `export/packing.py`): a valid atlas on smooth, ring-shaped, noisy,
folded and degenerate meshes, checked by counting texel centres independently of the product's code."""
import dataclasses
import math
from typing import get_args

import numpy as np
import pytest
import trimesh

from pixal3d_backend import protocol
from pixal3d_backend.export import ExportOptions
from pixal3d_backend.export.charts import JOIN_MAX_DEGREES
from pixal3d_backend.export.unwrap import UnwrapMethod, padding_texels, unwrap


def coverage(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(how many triangles cover each texel centre, one triangle covering it or -1), [size, size] each.

    A centre on an edge belongs to the triangle it would fall in if nudged by (e, e^2): triangles that tile the
    plane cover every centre once, so a count of 2 is an overlap."""
    tri = uvs[faces].astype(np.float64) * size - 0.5
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    b, c = np.where(area[:, None] < 0, c, b), np.where(area[:, None] < 0, b, c)
    tri = np.stack([a, b, c], 1)
    low, high = np.ceil(tri.min(1)).astype(int), np.floor(tri.max(1)).astype(int)
    span = (high - low + 1).clip(0)
    count = np.where(area != 0, span[:, 0] * span[:, 1], 0)
    t = np.repeat(np.arange(len(tri)), count)
    k = np.arange(t.size) - np.repeat(np.cumsum(count) - count, count)
    x, y = low[t, 0] + k % span[t, 0], low[t, 1] + k // span[t, 0]
    inside = np.ones(t.size, dtype=bool)
    for e in range(3):
        start, end = tri[t, e], tri[t, (e + 1) % 3]
        edge = (start[:, 0] - x) * (end[:, 1] - y) - (start[:, 1] - y) * (end[:, 0] - x)
        dx, dy = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
        inside &= (edge > 0) | ((edge == 0) & ((dy < 0) | ((dy == 0) & (dx > 0))))
    texel = y[inside] * size + x[inside]
    owner = np.full(size * size, -1)
    owner[texel] = t[inside]
    return np.bincount(texel, minlength=size * size).reshape(size, size), owner.reshape(size, size)


def uv_islands(faces: np.ndarray) -> np.ndarray:
    """Chart of each face: faces joined by edges whose ends share their new vertices."""
    mesh = trimesh.Trimesh(np.zeros((faces.max() + 1, 3)), faces, process=False)
    island = np.empty(len(faces), dtype=np.int64)
    for i, members in enumerate(trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(faces)))):
        island[members] = i
    return island


def check_atlas(vertices, faces, size, result, gutter=True):
    """Every property the unwrap promises (the gutter unless told otherwise); returns the faces' islands."""
    vmapping, new_faces, uvs = result
    assert vmapping.dtype == np.int64 and new_faces.dtype == np.int64 and uvs.dtype == np.float32
    assert new_faces.shape == faces.shape and len(vmapping) == len(uvs)
    np.testing.assert_array_equal(vertices[vmapping][new_faces], vertices[faces])     # same faces, in order
    assert uvs.min() >= 0 and uvs.max() <= 1
    count, owner = coverage(uvs, new_faces, size)
    assert count.max() <= 1, f"{int((count > 1).sum())} texel centres covered twice"
    # texels of two charts keep the gutter between them, also across the atlas border (samplers repeat)
    island = uv_islands(new_faces)
    chart_at = np.where(owner >= 0, island[owner.clip(0)], -1)
    reach = padding_texels(size) if gutter else 0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            near = np.roll(chart_at, (dy, dx), (0, 1))
            assert not ((chart_at >= 0) & (near >= 0) & (chart_at != near)).any(), (dy, dx)
    return island


def check_orthographic(vertices, faces, result):
    """Each face's UV triangle is its projection on a coordinate plane, turned, at one scale for all charts."""
    _, new_faces, uvs = result
    p = vertices[faces].astype(np.float64)
    q = uvs[new_faces].astype(np.float64)
    uv_edges = np.linalg.norm(q - np.roll(q, 1, 1), axis=-1)                           # [F, 3]
    d = p - np.roll(p, 1, 1)
    dropped = np.stack([np.linalg.norm(np.delete(d, k, -1), axis=-1) for k in range(3)], 1)   # [F, 3 planes, 3]
    normals = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    big = np.linalg.norm(normals, axis=-1) > 1e-3 * np.median(np.linalg.norm(normals, axis=-1))
    facing = np.abs(normals).argmax(-1)
    scale = np.median((uv_edges.sum(-1) / dropped[np.arange(len(p)), facing].sum(-1))[big])
    error = np.abs(uv_edges[:, None, :] - scale * dropped).max(-1) / uv_edges.max(-1, keepdims=True)   # [F, 3]
    plane = error.argmin(-1)
    assert error.min(-1)[big].max() < 1e-3
    # texel density: UV area over the area projected on that plane is one constant for every chart, and the
    # projected area over the true area is the cosine of the face's slant, at most JOIN_MAX_DEGREES
    (ax, ay), (bx, by) = (q[:, 1] - q[:, 0]).T, (q[:, 2] - q[:, 0]).T
    density = np.abs(ax * by - ay * bx) / np.abs(normals[np.arange(len(p)), plane])
    assert np.ptp(density[big]) < 1e-2 * np.median(density[big])       # float32 uvs of texel-sized slivers
    slant = np.abs(normals[np.arange(len(p)), plane]) / np.linalg.norm(normals, axis=-1)
    assert slant[big].min() > math.cos(math.radians(JOIN_MAX_DEGREES)) - 1e-6


def arrays(mesh: trimesh.Trimesh):
    return mesh.vertices.astype(np.float32), mesh.faces.astype(np.int64)


def noisy_sphere(subdivisions=4, noise=0.3, seed=0):
    """A sphere whose vertices are moved by `noise` edge lengths: ragged normals, crumpled fans, many charts."""
    mesh = trimesh.creation.icosphere(subdivisions, 0.4)
    step = mesh.edges_unique_length.mean()
    vertices = mesh.vertices + np.random.default_rng(seed).normal(0, noise * step, mesh.vertices.shape)
    return vertices.astype(np.float32), mesh.faces.astype(np.int64)


def helicoid(turns=2.5, steps=400, rings=6):
    """A ramp winding `turns` times round the Z axis, rising slowly: every normal is within 3 degrees of +Z,
    so it is one connected surface facing +Z whose projection covers the same annulus several times."""
    theta = np.linspace(0, 2 * np.pi * turns, steps + 1)
    radius = np.linspace(0.2, 0.4, rings + 1)
    t, r = np.meshgrid(theta, radius, indexing="ij")
    vertices = np.stack([r * np.cos(t), r * np.sin(t), 0.01 * t], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(steps), np.arange(rings), indexing="ij")
    v00 = (i * (rings + 1) + j).reshape(-1)
    v01, v10, v11 = v00 + 1, v00 + rings + 1, v00 + rings + 2
    faces = np.concatenate([np.stack([v00, v11, v10], 1), np.stack([v00, v01, v11], 1)])
    return vertices.astype(np.float32), faces.astype(np.int64)


def spiral_fan(turns=2, steps=60):
    """Triangles round one vertex, their outer edge a spiral of `turns` turns, all facing +Z: the fan turns
    twice round its centre."""
    theta = np.linspace(0, 2 * np.pi * turns, steps + 1)
    radius = np.linspace(0.2, 0.4, steps + 1)
    ring = np.stack([radius * np.cos(theta), radius * np.sin(theta), 0.002 * theta], -1)
    vertices = np.concatenate([[[0.0, 0.0, 0.0]], ring])
    faces = np.stack([np.zeros(steps, dtype=np.int64), np.arange(1, steps + 1), np.arange(2, steps + 2)], 1)
    return vertices.astype(np.float32), faces


def flapped_sheet(cells=24):
    """A flat grid facing +Z with flaps along one side: on each border edge a second face, on the same side as
    the grid's face there and wound the same way, just above it (a non-manifold edge, as decimation leaves
    them): a flap laid out with the grid would cover its face."""
    x, y = np.meshgrid(np.linspace(-0.4, 0.4, cells + 1), np.linspace(-0.4, 0.4, cells + 1), indexing="ij")
    vertices = np.stack([x, y, np.zeros_like(x)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    v00 = (i * (cells + 1) + j).reshape(-1)
    v01, v10, v11 = v00 + 1, v00 + cells + 1, v00 + cells + 2
    faces = np.concatenate([np.stack([v00, v10, v11], 1), np.stack([v00, v11, v01], 1)])
    side = faces[:cells * cells][j.reshape(-1) == 0]                 # (v00, v10, v11) with v00-v10 on the border
    tips = vertices[side[:, 2]] + [0.0, 0.0, 0.01]
    flaps = np.stack([side[:, 0], side[:, 1], len(vertices) + np.arange(len(side))], 1)
    return np.concatenate([vertices, tips]).astype(np.float32), np.concatenate([faces, flaps]).astype(np.int64)


MESHES = {
    "sphere": lambda: arrays(trimesh.creation.icosphere(5, 0.4)),
    "torus": lambda: arrays(trimesh.creation.torus(0.3, 0.08)),
    "noisy sphere": noisy_sphere,
    "spiral fan": spiral_fan,
    "flapped sheet": flapped_sheet,
}


def charts(vertices, faces, size):
    return unwrap(vertices, faces, np.zeros_like(vertices), size, "charts")


@pytest.mark.parametrize("name, size", [("sphere", 1024), ("torus", 512), ("noisy sphere", 512),
                                        ("spiral fan", 512), ("flapped sheet", 512)])
def test_chart_atlas_is_valid(name, size):
    vertices, faces = MESHES[name]()
    result = charts(vertices, faces, size)
    check_atlas(vertices, faces, size, result)
    check_orthographic(vertices, faces, result)


def test_smooth_surfaces_give_few_charts_and_fill_the_atlas():
    mesh = trimesh.creation.icosphere(5, 0.4)
    vmapping, new_faces, uvs = charts(mesh.vertices.astype(np.float32), mesh.faces.astype(np.int64), 1024)
    t = uvs[new_faces].astype(np.float64)
    (ax, ay), (bx, by) = (t[:, 1] - t[:, 0]).T, (t[:, 2] - t[:, 0]).T
    utilisation = np.abs(ax * by - ay * bx).sum() / 2
    assert uv_islands(new_faces).max() + 1 <= 12            # about one chart per axis direction
    assert len(vmapping) < 1.1 * len(mesh.vertices)        # few seams
    assert utilisation > 0.5


def test_a_ramp_winding_over_itself_is_split_until_nothing_overlaps():
    vertices, faces = helicoid()
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    assert (normals[:, 2] / np.linalg.norm(normals, axis=1)).min() > math.cos(math.radians(3))
    result = charts(vertices, faces, 512)
    island = check_atlas(vertices, faces, 512, result)
    check_orthographic(vertices, faces, result)
    assert island.max() + 1 >= 3                           # 2.5 turns: at least three pieces of under a turn


def with_slivers(vertices: np.ndarray, faces: np.ndarray, every: int):
    """Every `every`-th face (a, b, c) becomes (a, m, c), (m, b, c) and the zero-area sliver (a, b, m), with m the
    middle of a-b (to float32 rounding): a consistent closed surface again, with zero-area faces inside it."""
    chosen = np.arange(0, len(faces), every)
    a, b, c = faces[chosen].T
    m = len(vertices) + np.arange(len(chosen))
    vertices = np.concatenate([vertices, (vertices[a] + vertices[b]) / 2])
    kept = np.delete(faces, chosen, axis=0)
    return vertices, np.concatenate([kept, np.stack([a, m, c], 1), np.stack([m, b, c], 1), np.stack([a, b, m], 1)])


def test_zero_area_faces_are_laid_out_with_their_neighbours():
    mesh = trimesh.creation.icosphere(4, 0.4)
    vertices, faces = with_slivers(mesh.vertices.astype(np.float32), mesh.faces.astype(np.int64), every=7)
    zero = np.arange(len(faces)) >= len(faces) - len(range(0, len(mesh.faces), 7))     # the slivers, last
    result = charts(vertices, faces, 512)
    island = check_atlas(vertices, faces, 512, result)
    assert (np.bincount(island)[island[zero]] > 1).all()     # no zero-area face is a chart of its own


def test_charts_too_many_for_gutters_are_packed_touching_but_apart():
    """30 000 separate triangles cannot each keep a 2-texel gutter in a 512² atlas (3 x 3 texels each at
    least): they are packed without gutters rather than not at all, and still never overlap."""
    rng = np.random.default_rng(0)
    corners = rng.uniform(-0.4, 0.4, (30_000, 1, 3)) + rng.normal(0, 0.004, (30_000, 3, 3))
    vertices = corners.reshape(-1, 3).astype(np.float32)
    faces = np.arange(len(vertices)).reshape(-1, 3)
    result = charts(vertices, faces, 512)
    check_atlas(vertices, faces, 512, result, gutter=False)
    check_orthographic(vertices, faces, result)


def test_the_methods_are_those_of_the_protocol():
    option = {f.name: f for f in dataclasses.fields(protocol.Options)}["unwrap"]
    assert tuple(option.metadata["choices"]) == get_args(UnwrapMethod)
    assert protocol.Options().unwrap == ExportOptions().unwrap == "charts"
    with pytest.raises(ValueError, match="unwrap"):
        ExportOptions(unwrap="lscm")

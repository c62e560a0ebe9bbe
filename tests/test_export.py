"""Export stage: bake round trip, decimation target, watertight remesh, GLB contents and Blender import."""
import dataclasses
import functools
import json
import math
import struct
import subprocess
import sys
import textwrap
from typing import get_args

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from pixal3d_backend.camera import R_MODEL_TO_GLB, CropCamera, Intrinsics
from pixal3d_backend.export import ExportOptions, GlbCamera, export_asset, write_glb
from pixal3d_backend.export.bake import vertex_tangents
from pixal3d_backend.export import marching_cubes
from pixal3d_backend.export.decimate import decimate
from pixal3d_backend.export.remesh import WALL_CELLS, remesh
from pixal3d_backend.export.unwrap import UnwrapMethod
from pixal3d_backend.mesh import _component_labels

RES = 48
RADIUS = 0.35


def color_field(p: np.ndarray) -> np.ndarray:
    """The analytic base colour: smooth in position, period ~ the sphere size."""
    return 0.5 + 0.4 * np.sin(np.stack([5 * p[:, 0], 4 * p[:, 1] + 1, 3 * p[:, 2] - 1], 1))


def sphere_voxels(alpha_cut: bool):
    g = np.stack(np.meshgrid(*[np.arange(RES)] * 3, indexing="ij"), -1).reshape(-1, 3)
    c = (g + 0.5) / RES - 0.5
    coords = g[np.abs(np.linalg.norm(c, axis=1) - RADIUS) < 1.5 / RES]
    p = (coords + 0.5) / RES - 0.5
    alpha = np.where(p[:, 1] > 0.2, 0.0, 1.0) if alpha_cut else np.ones(len(p))
    attrs = np.concatenate([color_field(p), np.full((len(p), 1), 0.2), np.full((len(p), 1), 0.7), alpha[:, None]], 1)
    return coords, attrs.astype(np.float32)


@functools.cache
def exported_sphere(unwrap: str):
    mesh = trimesh.creation.icosphere(4, RADIUS)
    coords, attrs = sphere_voxels(alpha_cut=True)
    options = ExportOptions(face_target=1500, remesh=False, texture_size=512, unwrap=unwrap)
    return export_asset(mesh.vertices.astype(np.float32), mesh.faces, coords, attrs, RES, options, device="cpu")


@pytest.fixture(scope="module", params=get_args(UnwrapMethod))
def unwrapped_sphere(request):
    """The sphere exported with each UV unwrap method (the bake is checked through both layouts)."""
    return exported_sphere(request.param)


@pytest.fixture(scope="module")
def sphere_asset():
    return exported_sphere(ExportOptions().unwrap)


def _bilinear(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Samples img [T, T, C] at glTF uvs (row = v * T) with texel centres at +0.5."""
    t = img.shape[0]
    x, y = uv[:, 0] * t - 0.5, uv[:, 1] * t - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    at = lambda yy, xx: img[np.clip(yy, 0, t - 1), np.clip(xx, 0, t - 1)].astype(np.float64)
    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


def _surface_samples(asset, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    f = asset.faces[rng.integers(0, len(asset.faces), n)].astype(np.int64)
    b = rng.dirichlet(np.ones(3), n)
    interp = lambda a: (a[f] * b[:, :, None]).sum(1)
    return f, b, interp


def test_bake_round_trip(unwrapped_sphere):
    """Baked maps sampled back through the UVs reproduce the analytic field (error budget: trilinear sampling of
    voxel-centre values + uint8 + bilinear lookup, < 0.02 mean, < 0.06 at the 99th percentile)."""
    a = unwrapped_sphere
    _, _, interp = _surface_samples(a)
    p_model = interp(a.positions) @ R_MODEL_TO_GLB          # R is symmetric orthogonal: GLB -> model is R.T = R
    uv = interp(a.uvs)
    baked = _bilinear(a.base_color, uv) / 255
    keep = (p_model[:, 1] < 0.15)                            # away from the alpha cut at y = 0.2
    err = np.abs(baked[keep, :3] - color_field(p_model[keep]))
    assert err.mean() < 0.02 and np.quantile(err, 0.99) < 0.06, (err.mean(), np.quantile(err, 0.99))
    mr = _bilinear(a.metallic_roughness, uv) / 255
    assert np.allclose(mr[:, 1], 0.7, atol=0.01) and np.allclose(mr[:, 2], 0.2, atol=0.01)
    assert np.all(a.metallic_roughness[..., 0] == 0)
    alpha = _bilinear(a.base_color, uv)[:, 3] / 255
    assert alpha[p_model[:, 1] < 0.15].min() > 0.99 and alpha[p_model[:, 1] > 0.25].max() < 0.01


def test_normal_map_round_trip(unwrapped_sphere):
    """Decoding the normal map with the documented tangent frame gives the full-resolution sphere's normal
    (the low-poly facets' own normals are up to several degrees off)."""
    a = unwrapped_sphere
    f, b, interp = _surface_samples(a, seed=1)
    pos, nrm, uvs, faces = (torch.as_tensor(x) for x in (a.positions, a.normals, a.uvs, a.faces.astype(np.int64)))
    tangents = vertex_tangents(pos, nrm, uvs, faces).numpy()
    n = interp(a.normals)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    t = interp(tangents[:, :3])
    t = t - n * (n * t).sum(1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    bt = np.where(interp(tangents[:, 3:]) < 0, -1.0, 1.0) * np.cross(n, t)
    ts = _bilinear(a.normal_map, interp(a.uvs)) / 255 * 2 - 1
    decoded = ts[:, :1] * t + ts[:, 1:2] * bt + ts[:, 2:3] * n
    decoded /= np.linalg.norm(decoded, axis=1, keepdims=True)
    p = interp(a.positions)
    truth = p / np.linalg.norm(p, axis=1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip((decoded * truth).sum(1), -1, 1)))
    flat = np.degrees(np.arccos(np.clip((n * truth).sum(1), -1, 1)))
    assert np.median(angle) < 1.5 and np.quantile(angle, 0.95) < 4.0, (np.median(angle), np.quantile(angle, 0.95))
    assert np.median(angle) < np.median(flat)


def test_decimation_hits_face_target():
    mesh = trimesh.creation.icosphere(5)
    for target in (3000, 12345):
        v, f = decimate(mesh.vertices, mesh.faces, target)
        assert abs(len(f) - target) <= 0.02 * target
        assert f.max() == len(v) - 1 and f.min() == 0


def test_marching_cubes_of_any_sign_field_is_a_closed_2_manifold():
    """Random signs make every ambiguous face and cube case there is: each edge must join exactly two triangles
    (two neighbouring cells both fanning a polygon across the face they share made edges of four), with opposite
    directions (consistent orientation)."""
    r = 10
    values = torch.rand((r + 1,) * 3, generator=torch.Generator().manual_seed(0)) - 0.5
    values[[0, -1]], values[:, [0, -1]], values[:, :, [0, -1]] = 1.0, 1.0, 1.0      # outside at the border: closed
    cells = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    corners = cells[:, None] + torch.as_tensor(marching_cubes.CORNERS)
    vertex_key = lambda idx: (idx[..., 0] * (r + 1) + idx[..., 1]) * (r + 1) + idx[..., 2]
    vertices, faces = marching_cubes.marching_cubes(
        cells, values[corners[..., 0], corners[..., 1], corners[..., 2]], lambda idx: idx.float(),
        lambda idx, axis: vertex_key(idx) * 3 + axis)
    directed = torch.stack([faces, faces.roll(-1, dims=1)], -1).reshape(-1, 2)
    undirected, uses = torch.unique(directed.sort(1).values, dim=0, return_counts=True)
    assert len(faces) > 1000 and uses.min() == uses.max() == 2, f"edges used by {sorted(set(uses.tolist()))} triangles"
    assert len(torch.unique(directed, dim=0)) == len(directed)                  # each direction once: oriented
    assert trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=False).volume > 0   # outward


def _remeshed(mesh, resolution=64):
    v, f = remesh(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces), resolution)
    return trimesh.Trimesh(v.numpy(), f.numpy(), process=False)


def test_remesh_keeps_closed_input_watertight():
    torus = trimesh.creation.torus(0.3, 0.1)
    box = trimesh.creation.box((0.3, 0.2, 0.2))
    box.apply_translation((0.1, 0.0, 0.3))
    parts = trimesh.util.concatenate([torus, box])
    out = _remeshed(parts)
    assert out.is_watertight and out.is_winding_consistent
    # the surface is the input grown by WALL_CELLS grid cells: every output vertex that far from it within 0.15 cell
    # (marching cubes interpolates d linearly along grid edges), and the volume grown by about area * that
    eps = WALL_CELLS / 64
    _, dist, _ = trimesh.proximity.closest_point_naive(parts, out.vertices[::20])
    assert np.abs(dist - eps).max() < 0.15 / 64, ((dist.min() - eps) * 64, (dist.max() - eps) * 64)
    grown = parts.volume + parts.area * eps
    assert abs(out.volume - grown) < 0.03 * grown, (out.volume, grown)
    # overlapping closed parts (self-intersecting input) still give a closed, consistently oriented surface
    box.apply_translation((0.0, 0.0, -0.2))
    out = _remeshed(trimesh.util.concatenate([torus, box]))
    assert out.is_watertight and out.is_winding_consistent and out.volume > 0


def _components(faces: np.ndarray) -> int:
    """Connected components of a triangle list (the mesher's own labelling)."""
    f = torch.as_tensor(np.asarray(faces, dtype=np.int64))
    labels = _component_labels(int(f.max()) + 1, f.reshape(-1), f.roll(-1, dims=1).reshape(-1))
    return len(torch.unique(labels[torch.unique(f)]))


def test_remesh_of_a_messy_decoded_surface_survives_decimation():
    """What a decoder gives: a closed sphere with random face winding, a sheet inside it and a hole in it. The
    remesh is one closed surface around the sphere (no inner shells or bubbles) and decimating it to ~2 % of its
    faces keeps the solid: a sign read from the winding made inner shells that the decimation collapsed into
    holes (input-view IoU of exported assets fell from 0.88 to 0.82 on held-out objects)."""
    rng = np.random.default_rng(0)
    sphere = trimesh.creation.icosphere(4, radius=0.35)
    faces = sphere.faces.copy()
    flip = rng.random(len(faces)) < 0.5
    faces[flip] = faces[flip][:, ::-1]
    centroids = sphere.triangles_center
    faces = np.delete(faces, np.argmin(np.linalg.norm(centroids - [0.35, 0, 0], axis=1)), 0)  # a 1.5-cell hole
    sheet = trimesh.creation.box((0.4, 0.4, 0.002))                                    # a thin sheet inside
    mesh = trimesh.util.concatenate([trimesh.Trimesh(sphere.vertices, faces, process=False), sheet])
    out = _remeshed(mesh)
    assert out.is_watertight and _components(out.faces) == 1
    ball = 4 / 3 * np.pi * 0.35 ** 3
    assert ball < out.volume < 1.15 * ball, (out.volume, ball)
    v, f = decimate(out.vertices, out.faces, 2000)
    low = trimesh.Trimesh(v, f, process=False)
    assert abs(low.volume - out.volume) < 0.03 * out.volume, (low.volume, out.volume)
    assert low.is_watertight


def _read_glb(path):
    data = open(path, "rb").read()
    json_len = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + json_len])
    binary = data[20 + json_len + 8:]

    def view(i):
        bv = gltf["bufferViews"][i]
        return binary[bv.get("byteOffset", 0): bv.get("byteOffset", 0) + bv["byteLength"]]

    def accessor(i):
        acc = gltf["accessors"][i]
        dtype = {5126: np.float32, 5125: np.uint32, 5123: np.uint16}[acc["componentType"]]
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[acc["type"]]
        raw = view(acc["bufferView"])[acc.get("byteOffset", 0):]
        return np.frombuffer(raw, dtype=dtype, count=acc["count"] * width).reshape(acc["count"], width)

    def texture(i):
        import io
        return np.asarray(Image.open(io.BytesIO(view(gltf["images"][gltf["textures"][i]["source"]]["bufferView"]))))

    return gltf, accessor, texture


def test_glb_holds_the_asset(sphere_asset, tmp_path):
    a = sphere_asset
    path = tmp_path / "asset.glb"
    write_glb(a, path)
    gltf, accessor, texture = _read_glb(path)
    prim = gltf["meshes"][0]["primitives"][0]
    assert np.array_equal(accessor(prim["attributes"]["POSITION"]), a.positions)
    assert np.array_equal(accessor(prim["attributes"]["TEXCOORD_0"]), a.uvs)
    assert np.array_equal(accessor(prim["indices"]).reshape(-1, 3), a.faces)
    mat = gltf["materials"][prim["material"]]
    pbr = mat["pbrMetallicRoughness"]
    assert np.array_equal(texture(pbr["baseColorTexture"]["index"]), a.base_color)
    assert np.array_equal(texture(pbr["metallicRoughnessTexture"]["index"]), a.metallic_roughness)
    assert np.array_equal(texture(mat["normalTexture"]["index"]), a.normal_map)
    assert mat["alphaMode"] == a.alpha_mode == "MASK" and mat.get("doubleSided", False) is True


BLENDER_CHECK = textwrap.dedent("""
    import bpy, json, sys
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=sys.argv[1])
    mesh = next(o for o in bpy.context.scene.objects if o.type == "MESH")
    cam = next((o for o in bpy.context.scene.objects if o.type == "CAMERA"), None)
    bsdf = next(n for n in mesh.active_material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    def source(socket):
        # the node and socket feeding `socket`, looking through the Math nodes of a MASK cutoff
        while socket.links:
            link = socket.links[0]
            if link.from_node.type != "MATH":
                return [link.from_node.type, link.from_socket.name]
            socket = next(i for i in link.from_node.inputs if i.links)
        return None
    normal = bsdf.inputs["Normal"].links[0].from_node if bsdf.inputs["Normal"].links else None
    print("RESULT" + json.dumps({
        "vertices": len(mesh.data.vertices),
        "base": source(bsdf.inputs["Base Color"]), "alpha": source(bsdf.inputs["Alpha"]),
        "metallic": source(bsdf.inputs["Metallic"]), "roughness": source(bsdf.inputs["Roughness"]),
        "metal_from": source(bsdf.inputs["Metallic"].links[0].from_node.inputs[0]) if bsdf.inputs["Metallic"].links else None,
        "normal": normal.type if normal else None,
        "normal_from": source(normal.inputs["Color"]) if normal else None,
        "camera": [list(cam.matrix_world.translation), list(cam.matrix_world.to_euler("XYZ")), cam.data.angle] if cam else None,
    }))
""")


def _blender_import(path):
    out = subprocess.run([sys.executable, "-c", BLENDER_CHECK, str(path)], capture_output=True, text=True, timeout=300)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(line[len("RESULT"):])


def test_glb_imports_in_blender_with_material_links(sphere_asset, tmp_path):
    pytest.importorskip("bpy")
    crop = CropCamera.from_crop(Intrinsics.from_hfov(512, 512, math.radians(40)), 256, 256, 512)
    masked = tmp_path / "masked.glb"
    write_glb(sphere_asset, masked, camera=GlbCamera(crop.glb_to_camera(), crop.fov))
    opaque = tmp_path / "opaque.glb"
    write_glb(dataclasses.replace(sphere_asset, alpha_mode="OPAQUE"), opaque)
    r = _blender_import(masked)
    assert r["vertices"] == len(sphere_asset.positions)
    assert r["base"] == ["TEX_IMAGE", "Color"] and r["alpha"] == ["TEX_IMAGE", "Alpha"]
    assert r["metallic"] == ["SEPARATE_COLOR", "Blue"] and r["roughness"] == ["SEPARATE_COLOR", "Green"]
    assert r["metal_from"] == ["TEX_IMAGE", "Color"]
    assert r["normal"] == "NORMAL_MAP" and r["normal_from"] == ["TEX_IMAGE", "Color"]
    loc, rot, angle = r["camera"]                          # spec §7: (0, d, 0), rotation (90, 0, 180) degrees
    assert np.allclose(loc, [0, crop.distance, 0], atol=1e-4) and abs(angle - crop.fov) < 1e-4
    assert np.allclose(np.cos(rot), np.cos(np.radians([90, 0, 180])), atol=1e-4)
    assert _blender_import(opaque)["alpha"] is None


def test_the_closest_triangle_band_is_exact_and_the_same_in_any_chunking():
    """Every grid vertex within the radius of a surface gets its exact closest triangle (brute force over all
    triangles) and distance, however the (triangle, grid vertex) pairs are chunked (CPU and GPU sizes differ)."""
    from pixal3d_backend.export.closest import ClosestTriangleBand, Grid, closest_on_triangles, triangle_point
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    g = torch.Generator().manual_seed(0)
    v = torch.tensor(sphere.vertices, dtype=torch.float32) * (1 + 0.1 * torch.rand(len(sphere.vertices), 1, generator=g))
    f = torch.tensor(sphere.faces, dtype=torch.long)
    grid, radius = Grid(origin=-0.5, spacing=1 / 24, dims=25), 1.5 / 24
    bands = [ClosestTriangleBand.build(v, f, grid, radius, pairs_per_chunk=n) for n in (None, 257)]
    assert all(torch.equal(getattr(bands[0], k), getattr(bands[1], k)) for k in ("keys", "triangle", "distance"))
    band = bands[0]
    p = grid.position(grid.index(band.keys))
    tri = v[f]
    a, b, c = (tri[None, :, i].expand(len(p), -1, -1) for i in range(3))
    q = p[:, None].expand_as(a)
    brute = (q - triangle_point(closest_on_triangles(q, a, b, c), a, b, c)).norm(dim=-1).amin(1)
    assert len(band.keys) > 500 and (band.distance <= radius).all()
    torch.testing.assert_close(band.distance, brute, atol=1e-6, rtol=0)
    inside = (brute <= radius).sum()
    all_grid = grid.position(grid.index(torch.arange(grid.dims ** 3)))
    near = 0
    for chunk in torch.split(all_grid, 4096):
        qc = chunk[:, None].expand(-1, len(f), -1)
        ac, bc, cc = (tri[None, :, i].expand(len(chunk), -1, -1) for i in range(3))
        near += int(((qc - triangle_point(closest_on_triangles(qc, ac, bc, cc), ac, bc, cc)).norm(dim=-1).amin(1)
                     <= radius).sum())
    assert near == inside == len(band.keys)                   # no grid vertex within the radius is missing

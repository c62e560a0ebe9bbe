"""The whole product, with nothing stood in: a real `pixal3d serve` process (the bundled default model, on the
CPU here) on 127.0.0.1, and the add-on in the `bpy` module rendering the active camera's view of a mug built
from primitives, seen through a long lens with lens shift on a non-square frame.

One generation with the panel's defaults (Model Defaults on: the bundled model's own options; about a minute on two
idle CPU cores, more when they are busy) is shared by the tests of this module: the imported object lies in the
camera's frustum and reprojects onto the input's mask, its mesh has UVs and its Principled BSDF is wired node by
node, and it carries its provenance. The last test renders the README
picture (input render | the result from the source camera | the result from the side); to write it into the
repository:

    PIXAL3D_WRITE_FIGURE=1 .venv/bin/python -m pytest tests/test_addon_real_backend.py

In the `bpy` module no event loop runs timers, so the tests drive the add-on's timer callback (`run_timer`)
as Blender would every 0.1 s.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from backend_process import start_serve, stop_serve
from blender_helpers import REPO, check_material, enable_addon, reset_scene, run_timer

bpy, addon = enable_addon()
runtime = addon.runtime

from bpy_extras.object_utils import world_to_camera_view   # noqa: E402  (importable once bpy is)
from mathutils import Matrix, Vector                        # noqa: E402

FIGURE = REPO / "docs" / "figures" / "roundtrip.png"
GENERATION_TIMEOUT_S = 900.0     # one generation: ~60-90 s on two CPU cores
SEED = 7
RES_X, RES_Y = 480, 360          # non-square on purpose
BACKGROUND = (0.94, 0.94, 0.94)  # the figure's panels


# ---------------------------------------------------------------------------------------------------------
# A real `pixal3d serve`
# ---------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------
# The scene: a mug from primitives, a long-lens camera with shift
# ---------------------------------------------------------------------------------------------------------

def material(name: str, rgb: tuple[float, float, float], roughness: float) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    mat.diffuse_color = (*rgb, 1.0)           # what Workbench (the input render) shows
    mat.roughness = roughness
    return mat


def build_mug(collection) -> bpy.types.Object:
    """A glazed mug 0.9 m tall standing on the origin: a bevelled cylinder hollowed by a boolean (the inside
    takes the cutter's material), and a torus handle. Z is up."""
    glaze, inside = material("glaze", (0.02, 0.22, 0.30), 0.25), material("inside", (0.75, 0.36, 0.38), 0.4)
    bpy.ops.mesh.primitive_cylinder_add(vertices=96, radius=0.42, depth=0.9, location=(0.0, 0.0, 0.45))
    body = bpy.context.object
    body.name = "Mug"
    body.data.materials.append(glaze)
    bpy.ops.mesh.primitive_cylinder_add(vertices=96, radius=0.36, depth=0.9, location=(0.0, 0.0, 0.51))
    cutter = bpy.context.object
    cutter.name = "Mug inside"
    cutter.data.materials.append(inside)
    cutter.hide_render = cutter.hide_viewport = True
    hollow = body.modifiers.new("hollow", 'BOOLEAN')
    hollow.operation, hollow.object, hollow.solver, hollow.material_mode = 'DIFFERENCE', cutter, 'EXACT', 'TRANSFER'
    bevel = body.modifiers.new("rim", 'BEVEL')
    bevel.width, bevel.segments, bevel.limit_method = 0.015, 3, 'ANGLE'
    bpy.ops.object.shade_smooth_by_angle()
    bpy.ops.mesh.primitive_torus_add(major_radius=0.22, minor_radius=0.045, major_segments=64, minor_segments=24,
                                     location=(0.49, 0.0, 0.47), rotation=(math.pi / 2, 0.0, 0.0))
    handle = bpy.context.object
    handle.name = "Mug handle"
    handle.data.materials.append(glaze)
    bpy.ops.object.shade_smooth()
    handle.parent = body
    handle.matrix_parent_inverse = body.matrix_world.inverted()
    return body


def look_at(obj, target: Vector) -> None:
    direction = target - obj.location
    obj.rotation_euler = direction.to_track_quat('-Z', 'Y').to_euler()


@dataclass
class MugScene:
    scene: bpy.types.Scene
    camera: bpy.types.Object
    mug: list[bpy.types.Object]
    centre: Vector          # the mug's bounding-box centre, world


def build_scene() -> MugScene:
    reset_scene()
    scene = bpy.context.scene
    for obj in list(scene.objects):
        if obj.type != 'CAMERA':
            bpy.data.objects.remove(obj)
    body = build_mug(scene.collection)
    centre = Vector((0.0, 0.0, 0.45))
    camera = scene.camera
    camera.data.lens, camera.data.sensor_fit = 70.0, 'AUTO'
    camera.data.shift_x, camera.data.shift_y = 0.08, -0.05
    camera.location = (1.9, -5.0, 2.6)          # high and to the right: the handle shows, and the mug's mouth
    look_at(camera, centre)
    bpy.context.view_layer.update()             # matrix_world follows location/rotation only after an update
    render = scene.render
    render.resolution_x, render.resolution_y, render.resolution_percentage = RES_X, RES_Y, 100
    shading = scene.display.shading
    shading.light, shading.color_type, shading.show_specular_highlight = 'STUDIO', 'MATERIAL', True
    scene.display.render_aa = '8'
    prefs = bpy.context.preferences.addons["pixal3d"].preferences
    prefs.render_engine, prefs.timeout_s = "WORKBENCH", 10.0
    settings = scene.pixal3d
    settings.source, settings.seed, settings.random_seed = "CAMERA", SEED, False
    # The panel as an artist first sees it: Model Defaults on, so the bundled model's own options are sent.
    assert settings.model_defaults and settings.resolution == str(addon.worker.MODEL_DEFAULT_RESOLUTION)
    # The object's centre at the mug's distance along the view axis, so the side view compares sizes.
    settings.depth = -(camera.matrix_world.inverted() @ centre).z
    mug = [body, body.children[0]]
    return MugScene(scene, camera, mug, centre)


# ---------------------------------------------------------------------------------------------------------
# Renders read back as arrays
# ---------------------------------------------------------------------------------------------------------

def render_rgba(scene, camera, path: Path, color_type: str = 'TEXTURE') -> np.ndarray:
    """A Workbench render of `camera`'s view with a transparent film, as float RGBA rows top-down."""
    scene.camera = camera
    scene.render.engine = 'BLENDER_WORKBENCH'
    scene.render.film_transparent = True
    scene.display.shading.color_type = color_type
    scene.render.image_settings.file_format, scene.render.image_settings.color_mode = 'PNG', 'RGBA'
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0


def png_rgba(png: bytes) -> np.ndarray:
    import io
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.float32) / 255.0


def mask_centroid(mask: np.ndarray) -> np.ndarray:
    """Centroid of a boolean mask (rows top-down) in Blender's normalized view coordinates (x right, y up)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([(xs.mean() + 0.5) / w, 1.0 - (ys.mean() + 0.5) / h])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def bounding_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.prod(np.maximum(0, np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2])))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def visible(objects, show: bool) -> None:
    for obj in objects:
        obj.hide_render = not show


# ---------------------------------------------------------------------------------------------------------
# One generation, shared
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Generation:
    world: MugScene
    obj: bpy.types.Object
    input_png: bytes
    seconds: float
    stages: set
    workdir: Path


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("real-backend")
    process, address = start_serve(workdir / "store", workdir / "serve.log")
    try:
        world = build_scene()
        bpy.context.preferences.addons["pixal3d"].preferences.address = address
        before = set(bpy.data.objects.keys())
        started = time.monotonic()
        assert bpy.ops.pixal3d.generate() == {'FINISHED'}
        input_png = runtime.current.worker.job.views[0].png
        stages = set()
        run_timer(timeout_s=GENERATION_TIMEOUT_S,
                  on_tick=lambda: stages.add(bpy.context.window_manager.pixal3d.stage))
        seconds = time.monotonic() - started
        status = bpy.context.window_manager.pixal3d
        log = (workdir / "serve.log").read_text()[-3000:]
        assert status.last_error == "", f"{status.last_error}\nbackend log:\n{log}"
        new = set(bpy.data.objects.keys()) - before
        assert len(new) == 1, f"expected one imported object, got {sorted(new)}"
        yield Generation(world, bpy.data.objects[new.pop()], input_png, seconds, stages, workdir)
    finally:
        runtime.shutdown()
        stop_serve(process)


@pytest.mark.slow
def test_one_textured_object_is_imported_from_the_camera_render(generation):
    obj, mesh = generation.obj, generation.obj.data
    print(f"generation + import: {generation.seconds:.1f} s, stages {sorted(generation.stages)}")
    assert obj == bpy.context.view_layer.objects.active and obj.type == 'MESH'
    assert {"sparse_structure", "export"} <= generation.stages or len(generation.stages) >= 3
    assert 2_000 < len(mesh.polygons) <= 50_000 * 1.05, f"{len(mesh.polygons)} faces for a 50 000 face target"
    assert mesh.uv_layers.active is not None and mesh.uv_layers.active.name == "UVMap"
    uv = np.empty(len(mesh.loops) * 2, np.float32)
    mesh.uv_layers.active.data.foreach_get("uv", uv)
    assert np.isfinite(uv).all() and uv.min() >= -1e-3 and uv.max() <= 1.0 + 1e-3 and np.ptp(uv) > 0.5
    assert not mesh.validate(verbose=False), "the imported mesh needed repairs"
    assert len(mesh.vertices) < len(mesh.polygons), "the mesh is still split at its UV seams"
    # The default model often predicts some alpha; the material follows the backend's alpha mode.
    alpha_mode = generation.obj["pixal3d"]["metadata"]["alpha_mode"]
    check_material(obj.active_material, expect_alpha=alpha_mode != "OPAQUE", expect_normal=False)
    base = next(n for n in obj.active_material.node_tree.nodes if n.type == 'TEX_IMAGE' and n.label == "Base Color")
    assert tuple(base.image.size) == (1024, 1024)


@pytest.mark.slow
def test_the_object_lies_in_the_frustum_and_reprojects_onto_the_input(generation):
    world, obj = generation.world, generation.obj
    scene, camera = world.scene, world.camera
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    projected = np.array([world_to_camera_view(scene, camera, c) for c in corners])
    assert (projected[:, 2] > camera.data.clip_start).all(), "part of the object is behind the camera"
    assert (projected[:, :2] > -0.02).all() and (projected[:, :2] < 1.02).all(), \
        f"the bounding box leaves the frame: {projected[:, :2].min(0)} .. {projected[:, :2].max(0)}"

    input_mask = png_rgba(generation.input_png)[..., 3] > 0.5
    vertices = np.empty(len(obj.data.vertices) * 3)
    obj.data.vertices.foreach_get("co", vertices)
    world_vertices = [obj.matrix_world @ Vector(v) for v in vertices.reshape(-1, 3)[::7]]
    vertex_centroid = np.array([world_to_camera_view(scene, camera, v)[:2] for v in world_vertices]).mean(0)
    np.testing.assert_allclose(vertex_centroid, mask_centroid(input_mask), atol=0.06)

    # The result rendered from the source camera lands on the input's silhouette: what it covers lies inside
    # the input's mask (a 2-pixel margin for anti-aliasing), and its extent matches the mask's. (It need not
    # fill the mask: the bundled default model's surfaces are porous.)
    visible(world.mug, False)
    try:
        rendered = render_rgba(scene, camera, generation.workdir / "reprojected.png")
    finally:
        visible(world.mug, True)
    rendered_mask = rendered[..., 3] > 0.5
    inside = (rendered_mask & dilate(input_mask, 2)).sum() / rendered_mask.sum()
    box_overlap = box_iou(bounding_box(rendered_mask), bounding_box(input_mask))
    print(f"reprojection: {inside:.3f} inside the input mask, box IoU {box_overlap:.3f}, mask IoU "
          f"{iou(rendered_mask, input_mask):.3f}, centroid {mask_centroid(rendered_mask)} vs "
          f"{mask_centroid(input_mask)}")
    np.testing.assert_allclose(mask_centroid(rendered_mask), mask_centroid(input_mask), atol=0.03)
    assert inside > 0.9, f"only {inside:.0%} of the reprojected result lies on the input's mask"
    assert box_overlap > 0.75, f"the reprojected result's extent overlaps the input's by {box_overlap:.0%}"
    assert iou(rendered_mask, input_mask) > 0.3


@pytest.mark.slow
def test_provenance_names_the_model_seed_and_input(generation):
    info = generation.obj["pixal3d"].to_dict()
    assert info["model_id"] == "default"
    assert isinstance(info["model_hash"], str) and len(info["model_hash"]) >= 16
    assert info["seed"] == SEED and info["options"]["seed"] == SEED == info["options_sent"]["seed"]
    # Model Defaults: what was sent is the bundled model's suggestion (CPU-sized: 6 steps, 50,000 faces, 1024 px)
    bundled = json.loads((REPO / "backend" / "pixal3d_backend" / "default_model" / "pipeline.json").read_text())
    suggested = {"resolution": 256, **bundled["args"]["default_options"]}
    assert {k: info["options_sent"][k] for k in suggested} == suggested
    assert (info["options_sent"]["face_target"], info["options_sent"]["ss_steps"]) == (50_000, 6)
    assert info["source"] == "CAMERA" and info["cameras"] == [generation.world.camera.name]
    assert info["input_hashes"] == [addon.imaging.content_hash(generation.input_png)]
    assert len(info["job_id"]) == 32 and info["metadata"]["model_hash"] == info["model_hash"]


@pytest.mark.slow
def test_readme_figure(generation):
    """Input render | the result from the source camera | the result from the side, on one light background."""
    world, obj = generation.world, generation.obj
    scene, camera, workdir = world.scene, world.camera, generation.workdir
    panels = [png_rgba(generation.input_png)]
    visible(world.mug, False)
    try:
        panels.append(render_rgba(scene, camera, workdir / "source_view.png"))
        side = side_camera(scene, obj, camera)
        panels.append(render_rgba(scene, side, workdir / "side_view.png"))
    finally:
        visible(world.mug, True)
        scene.camera = camera
    assert all(p[..., 3].max() > 0.5 for p in panels), "a panel of the figure is empty"
    figure = compose(panels, ["input: camera render (RGBA)", "result, source camera", "result, side view"])
    out = workdir / "roundtrip.png"
    figure.save(out, optimize=True)
    if os.environ.get("PIXAL3D_WRITE_FIGURE") == "1":
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, FIGURE)
        print(f"wrote {FIGURE} ({FIGURE.stat().st_size // 1024} KiB)")
    assert out.stat().st_size < 300 * 1024


def side_camera(scene, obj, source):
    """A camera 90 degrees around the object (about world Z) from the source camera, at the same elevation
    and lens, framing the object's bounding box."""
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    centre = sum(corners, Vector()) / 8.0
    radius = max((c - centre).length for c in corners)
    offset = source.matrix_world.translation - centre
    offset = Matrix.Rotation(math.radians(-90.0), 3, 'Z') @ offset
    data = bpy.data.cameras.new("Figure side view")
    data.lens, data.sensor_fit = 50.0, 'AUTO'
    half_fov = 0.5 * 2.0 * math.atan(0.5 * data.sensor_width * RES_Y / RES_X / data.lens)   # the vertical one
    cam = bpy.data.objects.new(data.name, data)
    scene.collection.objects.link(cam)
    cam.location = centre + offset.normalized() * (1.15 * radius / math.sin(half_fov))
    look_at(cam, centre)
    return cam


def compose(panels: list[np.ndarray], labels: list[str]) -> Image.Image:
    """The panels over one background, side by side, each with its label underneath."""
    h, w = panels[0].shape[:2]
    label_h, gap = 28, 6
    sheet = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + label_h), (255, 255, 255))
    font = ImageFont.load_default(size=16)
    draw = ImageDraw.Draw(sheet)
    for i, (rgba, label) in enumerate(zip(panels, labels)):
        assert rgba.shape[:2] == (h, w)
        rgb = rgba[..., :3] * rgba[..., 3:] + np.array(BACKGROUND) * (1.0 - rgba[..., 3:])
        x = i * (w + gap)
        sheet.paste(Image.fromarray(np.uint8(np.round(rgb * 255.0))), (x, 0))
        draw.text((x + w / 2, h + label_h / 2), label, fill=(40, 40, 40), font=font, anchor="mm")
    return sheet


def test_a_mesh_split_at_uv_seams_is_imported_welded():
    """Fast: the wire's seam-split vertices (one UV per vertex) become one Blender vertex with per-loop UVs."""
    # Two triangles sharing the edge 1-2, split at it as a seam: vertices 3, 4 copy 1, 2 with other UVs.
    positions = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
    uvs = np.array([[0, 0], [.4, 0], [0, .4], [.6, .6], [.6, 1], [1, 1]], np.float32)
    normals = np.tile(np.float32([0, 0, 1]), (6, 1))
    arrays = addon.meshdata.prepare_mesh(positions, [[0, 1, 2], [3, 5, 4]], uvs, normals, np.eye(4))
    mesh = addon.importer.build_mesh("welded", arrays)
    try:
        assert len(mesh.vertices) == 4 and len(mesh.polygons) == 2 and len(mesh.edges) == 5
        loop_uv = np.empty(12, np.float32)
        mesh.uv_layers.active.data.foreach_get("uv", loop_uv)
        np.testing.assert_allclose(loop_uv.reshape(6, 2), np.column_stack([uvs[[0, 1, 2, 3, 5, 4], 0],
                                                                            1 - uvs[[0, 1, 2, 3, 5, 4], 1]]))
    finally:
        bpy.data.meshes.remove(mesh)

"""Multi-view from Blender cameras, with nothing stood in: a real `pixal3d serve` (the bundled default model, on
the CPU) and the add-on in the `bpy` module rendering three cameras around a mug ("Cameras" source, the active
camera is view 0). One object comes back, placed in view 0's frustum at the mug (several posed cameras fix the
scale a single view cannot), its provenance naming every camera; the rig check had nothing to say."""
from __future__ import annotations

import pytest

from backend_process import start_serve, stop_serve
from blender_helpers import enable_addon, reset_scene, run_timer

bpy, addon = enable_addon()
runtime = addon.runtime

from bpy_extras.object_utils import world_to_camera_view   # noqa: E402  (importable once bpy is)
from mathutils import Vector                                # noqa: E402
from test_addon_real_backend import build_mug, look_at      # noqa: E402

GENERATION_TIMEOUT_S = 1500.0    # three views on two busy CPU cores
CENTRE = Vector((0.0, 0.0, 0.45))   # the mug's box centre
CAMERAS = {"Main": (1.5, -4.5, 2.0), "Left": (-4.6, -0.8, 1.4), "Back": (0.9, 4.7, 2.4)}


def build_rig():
    """The mug and three cameras looking at it; "Main" active and selected with the others."""
    reset_scene()
    scene = bpy.context.scene
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    mug = build_mug(scene.collection)
    cameras = {}
    for name, position in CAMERAS.items():
        data = bpy.data.cameras.new(name)
        data.lens = 50.0
        cam = bpy.data.objects.new(name, data)
        scene.collection.objects.link(cam)
        cam.location = position
        look_at(cam, CENTRE)
        cameras[name] = cam
    scene.camera = cameras["Main"]
    bpy.context.view_layer.update()
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 320, 240, 100
    scene.display.shading.light, scene.display.shading.color_type = 'STUDIO', 'MATERIAL'
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj.type == 'CAMERA')
    bpy.context.view_layer.objects.active = cameras["Main"]
    prefs = bpy.context.preferences.addons["pixal3d"].preferences
    prefs.render_engine, prefs.timeout_s = "WORKBENCH", 60.0   # a busy 2-core machine starves the server
    settings = scene.pixal3d
    settings.source, settings.seed, settings.random_seed, settings.depth = "CAMERAS", 3, False, 0.0
    settings.resolution, settings.face_target, settings.texture_size = "256", 20_000, "512"
    return mug, cameras


@pytest.mark.slow
def test_three_cameras_give_one_object_in_view_0s_frustum_with_every_camera_recorded(tmp_path):
    process, address = start_serve(tmp_path / "store", tmp_path / "serve.log")
    try:
        mug, cameras = build_rig()
        bpy.context.preferences.addons["pixal3d"].preferences.address = address
        before = set(bpy.data.objects.keys())
        assert bpy.ops.pixal3d.generate() == {'FINISHED'}
        assert len(runtime.current.worker.job.views) == 3
        run_timer(timeout_s=GENERATION_TIMEOUT_S)
        status = bpy.context.window_manager.pixal3d
        assert status.last_error == "", f"{status.last_error}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
    finally:
        runtime.shutdown()
        stop_serve(process)
    new = set(bpy.data.objects.keys()) - before
    assert len(new) == 1, f"expected one imported object, got {sorted(new)}"
    obj = bpy.data.objects[new.pop()]
    provenance = obj["pixal3d"].to_dict()
    assert list(provenance["cameras"]) == ["Main", "Back", "Left"]        # view 0 first, then by name
    assert provenance["source"] == "CAMERAS" and provenance["rig_warnings"] == "[]"
    assert provenance["metadata"]["views"] == 3

    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    centre = sum(corners, Vector()) / 8
    scene = bpy.context.scene
    in_view = world_to_camera_view(scene, cameras["Main"], centre)
    assert 0.0 < in_view.x < 1.0 and 0.0 < in_view.y < 1.0 and in_view.z > 0.0
    # The cameras fix the metric scale: the object sits at the mug, not at the model's own crop distance.
    assert (centre - CENTRE).length < 0.3, f"object centre {tuple(centre)} vs mug {tuple(CENTRE)}"
    size = max(max(c[i] for c in corners) - min(c[i] for c in corners) for i in range(3))
    assert 0.4 < size < 3.0, f"object size {size} for a mug 0.9 tall"

"""The add-on against a real backend over real ZeroMQ on 127.0.0.1: Generate from the active camera's render,
the timer-driven worker, progress, import, material, provenance, undo, cancel, and a backend killed mid-job.

The backend is `pixal3d_backend.server.Server` running `test_server.SilhouetteGenerator` (real protocol, real
job queue; a flat textured mesh from the input's mask instead of the network), in this process or as a
separate process. In the `bpy` module no event loop runs timers, so the tests call the add-on's timer
callback `runtime.tick` themselves, as Blender would every 0.1 s.
"""
import time

import numpy as np
import pytest

from blender_helpers import check_material, enable_addon, reset_scene, run_timer

bpy, addon = enable_addon()
runtime = addon.runtime

from pixal3d_backend.server import Server                                   # noqa: E402
from test_server import SilhouetteGenerator, start_backend_process          # noqa: E402

TICK_LIMIT_S = 0.05


@pytest.fixture
def scene(tmp_path):
    reset_scene()
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 200, 150, 100
    prefs = bpy.context.preferences.addons["pixal3d"].preferences
    prefs.render_engine, prefs.timeout_s = "WORKBENCH", 2.0
    settings = scene.pixal3d
    settings.source, settings.texture_size, settings.ss_steps = "CAMERA", "512", 4
    yield scene
    runtime.shutdown()


@pytest.fixture
def server(tmp_path):
    started = []

    def start(step_s=0.0, **generator):
        server = Server(SilhouetteGenerator(step_s=step_s, **generator), bind="tcp://127.0.0.1:*",
                        store_dir=tmp_path / "store").start()
        started.append(server)
        bpy.context.preferences.addons["pixal3d"].preferences.address = server.address
        return server

    yield start
    for s in started:
        s.stop()


def render_settings(scene):
    r = scene.render
    return (r.engine, r.film_transparent, r.resolution_percentage, r.filepath, r.image_settings.file_format,
            r.image_settings.color_mode, scene.camera.name)


def test_generate_from_camera_imports_a_placed_textured_object(scene, server):
    server(step_s=0.05)
    scene.pixal3d.ss_steps = 10
    before_settings = render_settings(scene)
    before_objects = set(bpy.data.objects.keys())
    camera = scene.camera
    bpy.ops.ed.undo_push(message="before generate")

    assert bpy.ops.pixal3d.generate() == {'FINISHED'}
    assert render_settings(scene) == before_settings, "the camera render changed the user's render settings"
    assert not bpy.ops.pixal3d.generate.poll(), "a second job must wait for the first"
    stages = set()
    running, last = run_timer(on_tick=lambda: stages.add(bpy.context.window_manager.pixal3d.stage))

    status = bpy.context.window_manager.pixal3d
    assert status.last_error == ""
    assert "silhouette" in stages
    assert max(running) < TICK_LIMIT_S, f"timer ticks took up to {max(running) * 1e3:.1f} ms while the job ran"
    new = set(bpy.data.objects.keys()) - before_objects
    assert len(new) == 1
    obj = bpy.data.objects[new.pop()]
    assert obj == bpy.context.view_layer.objects.active

    # Placement: the silhouette mesh's centre (model origin) lies on the camera's optical axis, in front of it.
    in_camera = camera.matrix_world.inverted() @ obj.matrix_world.translation
    assert in_camera.z < 0 and abs(in_camera.x) < 1e-4 and abs(in_camera.y) < 1e-4

    # Provenance.
    info = obj["pixal3d"].to_dict()
    assert info["source"] == "CAMERA" and info["cameras"] == [camera.name]
    assert len(info["job_id"]) == 32 and info["model_id"] == "test-silhouette"
    assert info["options"]["ss_steps"] == 10 and info["seed"] == info["options"]["seed"]
    assert len(info["input_hashes"]) == 1 and len(info["input_hashes"][0]) == 64

    check_material(obj.active_material, expect_alpha=True, expect_normal=False)

    # Undo removes the imported object and nothing else.
    bpy.ops.ed.undo()
    assert set(bpy.data.objects.keys()) == before_objects


def test_model_defaults_send_what_the_model_suggests_and_the_panel_keeps_the_rest(scene, server):
    """The bundled model suggests CPU-sized options (6 steps, 50,000 faces, 1024 px maps); with Model Defaults on
    (the default) a job sends those instead of the panel's values, and says so in the panel and the provenance;
    off, the panel's values go as they are."""
    suggested = {"resolution": 1536, "ss_steps": 3, "texture_size": 1024}
    server(default_options=suggested)
    settings, status = scene.pixal3d, bpy.context.window_manager.pixal3d
    settings.ss_steps, settings.ss_guidance = 10, 5.0
    assert settings.model_defaults and settings.texture_size == "512"

    def generate():
        totals = set()
        assert bpy.ops.pixal3d.generate() == {'FINISHED'}
        run_timer(on_tick=lambda: totals.add(status.total))
        assert status.last_error == ""
        return bpy.context.view_layer.objects.active["pixal3d"].to_dict(), totals

    info, totals = generate()
    assert totals - {0} == {3}                                   # the backend ran the model's 3 steps
    sent = info["options_sent"]
    assert (sent["ss_steps"], sent["texture_size"], sent["resolution"]) == (3, 1024, 1536)
    assert sent["ss_guidance"] == 5.0 and sent["seed"] == info["seed"]     # not suggested: the panel's
    assert info["options"]["ss_steps"] == 10 and info["model_defaults"]     # what the panel said
    assert addon.properties.model_options(status) == suggested
    assert addon.properties.option_text("texture_size", 1024) == "Texture Size: 1024 px"

    settings.model_defaults = False
    info, totals = generate()
    assert totals - {0} == {10}
    sent = info["options_sent"]
    assert (sent["ss_steps"], sent["texture_size"], sent["resolution"]) == (10, 512, 1536)   # "Model Default" res


def test_material_opaque_with_normal_map():
    def png(rgba):
        return addon.imaging.encode_png_rgba(np.tile(np.uint8(rgba), (64, 64, 1)))

    maps = {"base_color": png([200, 120, 40, 255]), "metallic_roughness": png([0, 128, 255, 255]),
            "normal": png([128, 128, 255, 255])}
    material = addon.importer.build_material("opaque", maps)
    check_material(material, expect_alpha=False, expect_normal=True)


def test_cancel_mid_job_keeps_the_scene(scene, server):
    server(step_s=0.1)
    scene.pixal3d.ss_steps = 100
    before = set(bpy.data.objects.keys())
    bpy.ops.pixal3d.generate()

    def cancel_once_running():
        status = bpy.context.window_manager.pixal3d
        if status.step >= 2 and not status.cancelling and runtime.current is not None:
            bpy.ops.pixal3d.cancel()

    started = time.monotonic()
    run_timer(on_tick=cancel_once_running)
    assert time.monotonic() - started < 5.0
    status = bpy.context.window_manager.pixal3d
    assert status.message == "Cancelled" and status.last_error == "" and not status.running
    assert set(bpy.data.objects.keys()) == before


def test_backend_killed_mid_job_is_reported_and_a_restarted_backend_serves(scene, tmp_path):
    process, address = start_backend_process(tmp_path / "store")
    prefs = bpy.context.preferences.addons["pixal3d"].preferences
    prefs.address = address
    scene.pixal3d.ss_steps = 100           # 10 s at the subprocess's 0.1 s per step
    before = set(bpy.data.objects.keys())
    try:
        bpy.ops.pixal3d.generate()
        killed = []

        def kill_once_running():
            if bpy.context.window_manager.pixal3d.step >= 1 and not killed:
                process.kill()
                process.wait()
                killed.append(time.monotonic())

        run_timer(on_tick=kill_once_running)
        detected = time.monotonic() - killed[0]
        status = bpy.context.window_manager.pixal3d
        assert detected < 5.0, f"a dead backend was noticed after {detected:.1f} s"
        assert "Cannot reach the Pixal3D backend" in status.last_error and "pixal3d serve" in status.last_error
        assert not status.running and set(bpy.data.objects.keys()) == before

        port = int(address.rsplit(":", 1)[1])
        process, address = start_backend_process(tmp_path / "store", port=port)
        scene.pixal3d.ss_steps = 3
        assert bpy.ops.pixal3d.generate() == {'FINISHED'}
        run_timer()
        assert bpy.context.window_manager.pixal3d.last_error == ""
        assert len(set(bpy.data.objects.keys()) - before) == 1
    finally:
        process.kill()
        process.wait()


def test_unreachable_backend_is_reported_in_words(scene):
    bpy.context.preferences.addons["pixal3d"].preferences.address = "tcp://127.0.0.1:9"
    bpy.ops.pixal3d.generate()
    run_timer()
    error = bpy.context.window_manager.pixal3d.last_error
    assert "no answer from the Pixal3D backend at tcp://127.0.0.1:9" in error


def test_image_source_lands_on_the_cursor_with_a_matching_camera_and_regenerates(scene, server):
    server()
    image = bpy.data.images.new("photo", 96, 64, alpha=True)
    pixels = np.zeros((64, 96, 4), np.float32)
    pixels[16:48, 30:70] = 1.0
    image.pixels.foreach_set(pixels.ravel())
    settings = scene.pixal3d
    settings.source, settings.image = "IMAGE", image
    scene.cursor.location = (1.0, 2.0, 3.0)
    assert bpy.ops.pixal3d.generate() == {'FINISHED'}
    run_timer()
    assert bpy.context.window_manager.pixal3d.last_error == ""
    obj = bpy.context.view_layer.objects.active
    np.testing.assert_allclose(obj.matrix_world.translation, (1.0, 2.0, 3.0), atol=1e-5)
    camera = bpy.data.objects[obj["pixal3d"]["camera"]]
    assert camera.type == 'CAMERA' and list(camera["pixal3d_resolution"]) == [96, 64]

    seed = obj["pixal3d"]["options"]["seed"]
    assert bpy.ops.pixal3d.regenerate() == {'FINISHED'}
    run_timer()
    assert bpy.context.window_manager.pixal3d.last_error == ""
    again = bpy.context.view_layer.objects.active
    assert again != obj and again["pixal3d"]["options"]["seed"] != seed

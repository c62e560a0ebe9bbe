"""The add-on against a backend that lets in only the client keys it knows (`--client-keys`): the preferences
create this Blender's key pair and copy its public key; a backend that does not know the key refuses the job
with a message naming it; once the key is in the backend's folder, Generate round-trips.

The backend is a real `Server` with CurveZMQ keys on 127.0.0.1, running `test_server.SilhouetteGenerator`.
"""
import pytest
import zmq

from blender_helpers import enable_addon, reset_scene, run_timer

bpy, addon = enable_addon()
runtime = addon.runtime

from pixal3d_backend.server import Server, read_key, write_keypair     # noqa: E402
from test_server import SilhouetteGenerator                             # noqa: E402


@pytest.fixture
def prefs():
    reset_scene()
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 120, 90, 100
    scene.pixal3d.source, scene.pixal3d.texture_size, scene.pixal3d.ss_steps = "CAMERA", "512", 2
    prefs = bpy.context.preferences.addons["pixal3d"].preferences
    saved = {name: getattr(prefs, name) for name in ("address", "server_public_key", "client_public_key",
                                                       "client_secret_key", "render_engine", "timeout_s")}
    prefs.render_engine, prefs.timeout_s = "WORKBENCH", 2.0
    yield prefs
    runtime.shutdown()
    for name, value in saved.items():
        setattr(prefs, name, value)


def test_only_a_client_key_the_backend_allows_gets_a_job_through(prefs, tmp_path):
    server_public, server_secret = write_keypair(tmp_path / "keys")
    allowed = tmp_path / "allowed"
    write_keypair(allowed, "someone-else")
    server = Server(SilhouetteGenerator(), bind="tcp://127.0.0.1:*", store_dir=tmp_path / "store",
                    curve_secret_key=read_key(server_secret), client_keys_dir=allowed).start()
    try:
        prefs.address, prefs.server_public_key = server.address, server_public.read_text().strip()
        assert not bpy.ops.pixal3d.copy_client_key.poll()          # nothing to copy yet
        assert bpy.ops.pixal3d.create_client_key() == {'FINISHED'}
        public = prefs.client_public_key
        assert zmq.curve_public(prefs.client_secret_key.encode()).decode() == public
        assert bpy.ops.pixal3d.copy_client_key() == {'FINISHED'}
        assert bpy.context.window_manager.clipboard in (public, "")   # "" where the bpy module has no clipboard

        before = set(bpy.data.objects.keys())
        assert bpy.ops.pixal3d.generate() == {'FINISHED'}
        run_timer()
        error = bpy.context.window_manager.pixal3d.last_error
        assert "does not allow this client" in error and public in error and "--client-keys" in error
        assert set(bpy.data.objects.keys()) == before

        (allowed / "blender.public").write_text(public + "\n")      # what the backend's operator does
        assert bpy.ops.pixal3d.generate() == {'FINISHED'}
        run_timer()
        assert bpy.context.window_manager.pixal3d.last_error == ""
        assert len(set(bpy.data.objects.keys()) - before) == 1
    finally:
        server.stop()

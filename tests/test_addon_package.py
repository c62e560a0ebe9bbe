"""`build_addon.py`: the extension zip builds with the pyzmq wheels and installs and enables in a fresh `bpy`
session with no network, using the bundled copies of the backend's shared modules and the bundled pyzmq."""
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import build_addon  # noqa: E402

INSTALL_SCRIPT = r"""
import json, os, sys
import bpy
zip_path, report = sys.argv[-2:]
result = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
addon = sys.modules["bl_ext.user_default.pixal3d"]
site = os.path.join(bpy.utils.user_resource('EXTENSIONS'), ".local", "lib",
                    "python{}.{}".format(*sys.version_info[:2]), "site-packages")
with open(report, "w") as f:
    json.dump({"result": sorted(result), "online": bpy.app.online_access,
               "enabled": "bl_ext.user_default.pixal3d" in bpy.context.preferences.addons,
               "camera_module": addon.shared.camera.__name__, "client_module": addon.shared.client.__name__,
               "site_packages": sorted(os.listdir(site)),
               "generate_registered": hasattr(bpy.ops.pixal3d, "generate") and bpy.ops.pixal3d.generate.poll()
               in (True, False)}, f)
"""


@pytest.fixture(scope="module")
def linux_zip(tmp_path_factory):
    """The add-on built offline for linux-x64 from the wheels `setup.sh` fetched (tests never use the network)."""
    wheels = REPO / ".cache" / "wheels"
    if not any(wheels.glob("pyzmq-*.whl")):
        pytest.fail(f"no pyzmq wheels in {wheels}: run ./setup.sh, which fetches them")
    out = tmp_path_factory.mktemp("dist")
    return build_addon.build(out, ["linux-x64"], wheels, offline=True)


def test_zip_layout_and_manifest(linux_zip):
    with zipfile.ZipFile(linux_zip) as archive:
        names = set(archive.namelist())
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
    assert {"__init__.py", "shared.py", "pixal3d_shared/camera.py", "pixal3d_shared/protocol.py",
            "pixal3d_shared/client.py"} <= names
    assert not any("__pycache__" in n for n in names)
    assert manifest["id"] == "pixal3d" and manifest["blender_version_min"] == "4.2.0"
    assert manifest["platforms"] == ["linux-x64"] and "network" in manifest["permissions"]
    wheels = [w.removeprefix("./") for w in manifest["wheels"]]
    assert all(w in names for w in wheels)
    assert any("-cp311-cp311-" in w for w in wheels) and any("-abi3-" in w for w in wheels)
    for source in ("camera.py", "protocol.py", "client.py"):       # copies, byte for byte, of the one source
        with zipfile.ZipFile(linux_zip) as archive:
            assert archive.read(f"pixal3d_shared/{source}") == \
                (REPO / "backend" / "pixal3d_backend" / source).read_bytes()


def test_wheel_selection_per_platform_and_python():
    match = build_addon.wheel_matches
    assert match("pyzmq-27.3.0-cp311-cp311-win_amd64.whl", "windows-x64", "3.11")
    assert not match("pyzmq-27.3.0-cp312-abi3-win_amd64.whl", "windows-x64", "3.11")
    assert match("pyzmq-27.3.0-cp312-abi3-win_amd64.whl", "windows-x64", "3.13")
    assert match("pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl", "macos-arm64", "3.11")
    assert match("pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl", "macos-x64", "3.11")
    assert not match("pyzmq-27.3.0-cp311-cp311-macosx_11_0_arm64.whl", "macos-x64", "3.11")
    assert match("pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl", "linux-x64", "3.13")
    assert not match("pyzmq-27.3.0-cp311-cp311-manylinux_2_28_aarch64.whl", "linux-x64", "3.11")


def test_zip_installs_and_enables_offline_in_a_fresh_blender(linux_zip, tmp_path):
    report = tmp_path / "report.json"
    script = tmp_path / "install.py"
    script.write_text(INSTALL_SCRIPT)
    # A fresh user: empty resource folders, no backend package on the path, so the add-on must use its bundle.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "BLENDER_USER_RESOURCES": str(tmp_path / "blender")}
    subprocess.run([sys.executable, str(script), str(linux_zip), str(report)], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    info = json.loads(report.read_text())
    assert info["result"] == ["FINISHED"] and info["enabled"] and not info["online"]
    assert info["camera_module"] == "bl_ext.user_default.pixal3d.pixal3d_shared.camera"
    assert info["client_module"] == "bl_ext.user_default.pixal3d.pixal3d_shared.client"
    assert "zmq" in info["site_packages"]
    assert [p for p in info["site_packages"] if p.endswith(".dist-info")] == ["pyzmq-27.3.0.dist-info"]
    assert info["generate_registered"]

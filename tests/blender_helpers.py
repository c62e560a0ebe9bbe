"""Helpers for the add-on tests: the repository's `blender_addon/` enabled in the `bpy` module as the add-on
`pixal3d` (its shared modules then come from the backend package, see `blender_addon/shared.py`)."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADDON = "pixal3d"

if str(REPO / "backend") not in sys.path:
    sys.path.insert(0, str(REPO / "backend"))


def enable_addon():
    """Imports bpy, enables the add-on once per process and returns (bpy, the add-on module)."""
    import bpy
    import addon_utils   # importable once bpy is

    if ADDON not in bpy.context.preferences.addons:
        links = Path(tempfile.mkdtemp(prefix="pixal3d-addon-"))
        os.symlink(REPO / "blender_addon", links / ADDON)
        sys.path.insert(0, str(links))
        module = addon_utils.enable(ADDON, default_set=True)
        if module is None:
            raise RuntimeError("enabling the Pixal3D add-on failed (see the output above)")
    return bpy, sys.modules[ADDON]


def reset_scene():
    """A fresh default scene (factory settings), with the add-on still enabled."""
    import bpy
    bpy.ops.wm.read_homefile(use_factory_startup=True, use_empty=False)
    for window in bpy.context.window_manager.windows:
        window.scene = bpy.data.scenes[0]


def run_timer(timeout_s=30.0, on_tick=None):
    """Calls the add-on's timer callback like Blender does (the `bpy` module runs no event loop) until the job is
    over; returns the tick durations measured while the job ran, and the final tick (the import) separately."""
    runtime = sys.modules[ADDON].runtime
    ticks, deadline = [], time.monotonic() + timeout_s
    while runtime.current is not None:
        assert time.monotonic() < deadline, "the job never finished"
        session = runtime.current
        runtime.tick()
        ticks.append(session.last_tick_s)
        if on_tick is not None:
            on_tick()
        time.sleep(runtime.TICK_S / 5)
    return ticks[:-1], ticks[-1]


def check_material(material, expect_alpha, expect_normal):
    """The imported material, node by node: Principled BSDF fed by packed images in the right colour spaces."""
    nodes = material.node_tree.nodes
    bsdf = next(n for n in nodes if n.type == 'BSDF_PRINCIPLED')

    def source(socket_name):
        links = bsdf.inputs[socket_name].links
        return (links[0].from_node, links[0].from_socket.name) if links else (None, None)

    base, out = source("Base Color")
    assert base.type == 'TEX_IMAGE' and out == "Color"
    assert base.image.colorspace_settings.name == "sRGB" and base.image.packed_file is not None
    alpha_node, alpha_out = source("Alpha")
    if expect_alpha:
        assert alpha_node == base and alpha_out == "Alpha"
        assert material.surface_render_method == 'BLENDED'
    else:
        assert alpha_node is None
    for socket_name, channel in (("Roughness", "Green"), ("Metallic", "Blue")):
        split, out = source(socket_name)
        assert split.type == 'SEPARATE_COLOR' and out == channel
        mr = split.inputs["Color"].links[0].from_node
        assert mr.type == 'TEX_IMAGE' and mr.image.colorspace_settings.is_data and mr.image.packed_file
    normal_map, out = source("Normal")
    if expect_normal:
        assert normal_map.type == 'NORMAL_MAP' and out == "Normal"
        tex = normal_map.inputs["Color"].links[0].from_node
        assert tex.type == 'TEX_IMAGE' and tex.image.colorspace_settings.is_data
    else:
        assert normal_map is None

"""Helpers for the add-on tests: the repository's `blender_addon/` enabled in the `bpy` module as the add-on
`pixal3d` (its shared modules then come from the backend package, see `blender_addon/shared.py`)."""
from __future__ import annotations

import os
import sys
import tempfile
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

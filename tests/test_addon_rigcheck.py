"""The add-on's multi-view rig check on exact silhouettes: a ball seen by three cameras, then the same rig with
one camera moved, one looking away and one too close."""
import math

import numpy as np

from blender_helpers import enable_addon
from camera_rigs import look_at_c2w

bpy, addon = enable_addon()
camera = addon.shared.camera
check_rig = addon.rigcheck.check_rig

WIDTH, HEIGHT = 120, 90
RADIUS = 0.5


def ball_mask(intrinsics, c2w, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Exact silhouette (rows top-down) of a ball of RADIUS at `centre`."""
    x, y = np.meshgrid(np.arange(WIDTH) + 0.5, np.arange(HEIGHT) + 0.5)
    local = np.stack([(x - intrinsics.cx) / intrinsics.focal, -(y - intrinsics.cy) / intrinsics.focal,
                      -np.ones_like(x)], -1)
    rays = local @ c2w[:3, :3].T
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    to_centre = np.asarray(centre) - c2w[:3, 3]
    along = rays @ to_centre
    miss = np.linalg.norm(to_centre - along[..., None] * rays, axis=-1)
    return (miss < RADIUS) & (along > 0)


def rig(positions, lens=0.5):
    k = camera.Intrinsics.from_hfov(WIDTH, HEIGHT, lens)
    c2ws = [look_at_c2w(p) for p in positions]
    return [k] * len(c2ws), c2ws


POSITIONS = [(0.0, -4.0, 1.0), (3.5, 2.0, 1.5), (-3.0, 2.5, -0.5)]
NAMES = ["Front", "Right", "Left"]


def test_a_rig_that_sees_one_object_passes():
    ks, c2ws = rig(POSITIONS)
    assert check_rig(NAMES, [ball_mask(k, c) for k, c in zip(ks, c2ws)], ks, c2ws) == []


def test_a_moved_camera_is_reported():
    ks, c2ws = rig(POSITIONS)
    masks = [ball_mask(k, c) for k, c in zip(ks, c2ws)]
    turn = math.radians(6.0)               # the camera was panned after its render: its pose no longer matches
    pan = np.array([[math.cos(turn), 0, math.sin(turn), 0], [0, 1, 0, 0], [-math.sin(turn), 0, math.cos(turn), 0],
                    [0, 0, 0, 1]])
    moved = c2ws[:2] + [c2ws[2] @ pan]
    warnings = check_rig(NAMES, masks, ks, moved)
    assert warnings and any("disagrees" in w or "do not agree" in w for w in warnings)


def test_a_camera_that_does_not_see_the_object_is_named():
    ks, c2ws = rig(POSITIONS)
    masks = [ball_mask(k, c) for k, c in zip(ks, c2ws)]
    away = look_at_c2w(POSITIONS[1], target=(10.0, 10.0, 1.5))
    masks[1] = ball_mask(ks[1], away)
    warnings = check_rig(NAMES, masks, ks, [c2ws[0], away, c2ws[2]])
    assert warnings == ["Camera 'Right' does not see the object: its render is empty. Point it at the object or "
                        "leave it out."]


def test_a_camera_too_close_is_told_it_cuts_the_object_off():
    positions = POSITIONS[:2] + [(-0.6, 0.5, -0.1)]
    ks, c2ws = rig(positions)
    warnings = check_rig(NAMES, [ball_mask(k, c) for k, c in zip(ks, c2ws)], ks, c2ws)
    assert any(w.startswith("Camera 'Left' cuts the object off") for w in warnings)

"""Placement of a generated object in its source camera, checked against Blender's own projection
(`bpy_extras.object_utils.world_to_camera_view`) for real camera objects: lenses, sensor fits, shifts and
non-square resolutions. The mesh goes through the add-on's whole path: crop camera -> `glb_to_camera` ->
`Placement` -> `prepare_mesh` -> an imported object's world matrix."""
import itertools
import math

import numpy as np
import pytest

from blender_helpers import enable_addon

bpy, addon = enable_addon()
from bpy_extras.object_utils import world_to_camera_view   # noqa: E402
from mathutils import Matrix, Vector                         # noqa: E402

from pixal3d_backend.camera import CropCamera, R_MODEL_TO_GLB   # noqa: E402

meshdata, render = addon.meshdata, addon.render

# Model-frame probes: the cube's mid-depth cross-section corners, and its centre (the crop's optical axis).
MID_CORNERS = np.array([[-0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, -0.5, 0.0], [-0.5, -0.5, 0.0]])
CENTRE = np.zeros((1, 3))

CASES = list(itertools.product(
    [(18.0, 36.0, 24.0), (50.0, 36.0, 24.0), (135.0, 23.5, 15.6)],   # lens, sensor width, sensor height
    ["AUTO", "HORIZONTAL", "VERTICAL"],
    [(0.0, 0.0), (0.12, -0.07)],                                     # shift x, y
    [(640, 480), (360, 720), (512, 512)]))                           # resolution


def make_camera(lens, sensor_w, sensor_h, fit, shift, name="Cam"):
    data = bpy.data.cameras.new(name)
    data.lens, data.sensor_width, data.sensor_height, data.sensor_fit = lens, sensor_w, sensor_h, fit
    data.shift_x, data.shift_y = shift
    obj = bpy.data.objects.new(name, data)
    bpy.context.scene.collection.objects.link(obj)
    obj.matrix_world = (Matrix.Translation((1.5, -4.0, 2.2)) @ Matrix.Rotation(math.radians(70), 4, 'X')
                        @ Matrix.Rotation(math.radians(25), 4, 'Z'))
    return obj


def project_pixels(scene, cam, world_points, width, height):
    """Blender's projection of world points to pixel coordinates (x right, y down)."""
    out = []
    for p in world_points:
        ndc = world_to_camera_view(scene, cam, Vector(p))
        out.append((ndc.x * width, (1.0 - ndc.y) * height))
    return np.array(out)


def to_glb(model_points):
    return model_points @ R_MODEL_TO_GLB.T


def world_points_of(placement, arrays, camera_world):
    co = arrays.co.reshape(-1, 3).astype(np.float64)
    world = placement.object_matrix_world(camera_world)
    return co @ world[:3, :3].T + world[:3, 3]


@pytest.mark.parametrize("lens_sensor,fit,shift,resolution", CASES)
def test_mid_slice_corners_land_on_crop_corners(lens_sensor, fit, shift, resolution):
    scene = bpy.context.scene
    width, height = resolution
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = width, height, 100
    cam = make_camera(*lens_sensor, fit, shift)
    try:
        intrinsics = render.camera_intrinsics(cam, width, height)
        # An off-centre square crop, as the backend's alpha crop makes it.
        size = 0.6 * min(width, height)
        crop_cx, crop_cy = 0.55 * width, 0.42 * height
        glb_to_camera = CropCamera.from_crop(intrinsics, crop_cx, crop_cy, size).glb_to_camera()
        probes = to_glb(np.concatenate([MID_CORNERS, CENTRE]))
        camera_world = render.camera_c2w(cam)
        expected = np.array([[crop_cx - size / 2, crop_cy - size / 2], [crop_cx + size / 2, crop_cy - size / 2],
                             [crop_cx + size / 2, crop_cy + size / 2], [crop_cx - size / 2, crop_cy + size / 2],
                             [crop_cx, crop_cy]])
        for depth in (0.0, 7.5):
            placement = meshdata.Placement.from_result(glb_to_camera, depth)
            arrays = meshdata.prepare_mesh(probes, np.zeros((0, 3), np.uint32), None, None, placement.mesh_matrix)
            pixels = project_pixels(scene, cam, world_points_of(placement, arrays, camera_world), width, height)
            np.testing.assert_allclose(pixels, expected, atol=1e-3 * max(width, height))
            if depth:
                origin = placement.object_matrix_world(camera_world)[:3, 3]
                in_camera = np.linalg.inv(camera_world) @ np.append(origin, 1.0)
                assert in_camera[2] == pytest.approx(-depth)
    finally:
        bpy.data.objects.remove(cam)


def test_object_transform_is_rigid_times_uniform_scale():
    """The shear lives in the mesh data; the object transform stays a similarity, so the object can be moved
    and scaled by artists as usual."""
    intr = addon.shared.camera.blender_intrinsics(35.0, 36.0, 24.0, "AUTO", 800, 600, 0.1, 0.05)
    g2c = CropCamera.from_crop(intr, 500.0, 250.0, 300.0).glb_to_camera()
    placement = meshdata.Placement.from_result(g2c, 3.0)
    linear = placement.object_in_camera[:3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    np.testing.assert_allclose(linear.T @ linear, scale ** 2 * np.eye(3), atol=1e-9)


def test_normals_follow_the_sheared_surface():
    """A face's custom normal stays perpendicular to the face after the shear of an off-centre crop."""
    intr = addon.shared.camera.blender_intrinsics(50.0, 36.0, 24.0, "AUTO", 800, 600)
    g2c = CropCamera.from_crop(intr, 650.0, 120.0, 200.0).glb_to_camera()
    placement = meshdata.Placement.from_result(g2c)
    tri = np.array([[0.0, 0.0, 0.0], [0.3, 0.1, -0.2], [0.1, 0.4, 0.3]])
    normal = np.cross(tri[1] - tri[0], tri[2] - tri[0])
    arrays = meshdata.prepare_mesh(tri, [[0, 1, 2]], None, np.tile(normal, (3, 1)), placement.mesh_matrix)
    co = arrays.co.reshape(-1, 3)
    np.testing.assert_allclose(arrays.normals[0] @ (co[1] - co[0]), 0.0, atol=1e-6)
    np.testing.assert_allclose(arrays.normals[0] @ (co[2] - co[0]), 0.0, atol=1e-6)

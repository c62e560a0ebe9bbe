"""Camera conventions of Pixal3D: the one place that says how frames, cameras and pixels relate.

Pure Python + NumPy (no torch, no bpy): the backend, the exporter and the Blender add-on all import this
module (`build_addon.py` ships it inside the extension).

Frames (spec `pixal3d_reference.md` §2 and §7):

* model frame `v = (x_v, y_v, z_v)`: decoded meshes live in the cube [-0.5, 0.5]^3. The conditioning camera
  sits at `(0, 0, mesh_scale * d)` looking along -z_v, +y_v up, +x_v right (OpenGL camera convention).
  Camera-local coordinates of a model point are `p_cam = v / mesh_scale - (0, 0, d)`.
* Blender-style world of the projection grid: `w = R_MODEL_TO_WORLD @ v / mesh_scale = (x, -z, y) / ms`,
  seen by the "front view" camera `front_view_c2w(d)` at (0, -d, 0) looking along +Y.
* official GLB frame (Y-up): `g = (-x_v, y_v, -z_v)`.
* Blender import of a GLB (+Y up -> +Z up): `b = (g_x, -g_z, g_y) = (-x_v, z_v, y_v)`.

Pixels: image x to the right, image y down, pixel centres at integer + 0.5 (the projection adds 0.5 before
normalising, spec §2.2). Blender camera shifts are in units of the fitted sensor dimension in pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Model frame -> Blender-style world of the projection grid: (x, y, z) -> (x, -z, y).
R_MODEL_TO_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# Model frame -> official GLB frame: (x, y, z) -> (-x, y, -z), a 180 degree turn about Y.
R_MODEL_TO_GLB = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
# glTF (+Y up) -> Blender (+Z up), what Blender's glTF importer does: (x, y, z) -> (x, -z, y).
R_GLB_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def front_view_c2w(distance: float) -> np.ndarray:
    """Official "front_view_transform_matrix": Blender camera at (0, -d, 0) looking along +Y, up +Z."""
    return np.array([[1.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, -1.0, -float(distance)],
                     [0.0, 1.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 1.0]])


def focal_pixels(fov: float, image_size: float) -> float:
    """Pinhole focal length in pixels for a horizontal FOV (radians) over `image_size` pixels."""
    return image_size / (2.0 * math.tan(fov / 2.0))


def fov_from_focal(focal_px: float, image_size: float) -> float:
    return 2.0 * math.atan(image_size / (2.0 * focal_px))


def distance_from_fov(fov: float, extend_pixel: float = 0.0, mesh_scale: float = 1.0,
                      image_resolution: int = 512) -> tuple[float, float]:
    """Official `inference.distance_from_fov`: the camera distance at which the mid-depth cross-section of the
    model cube spans the image width. Returns (distance, f_pixels).

    The official code works on float32 torch tensors: the focal length `16 / tan(fov/2) * S / 32` and the grid
    point `-1 / mesh_scale / 2` are float32, the distance is then a Python float. Both roundings are reproduced
    (they move the distance by ~1e-7, which the parity fixture resolves).
    """
    half_angle = np.float32(fov) / np.float32(2.0)
    f_px = float(np.float32(16.0) / np.tan(half_angle) * np.float32(image_resolution) / np.float32(32.0))
    x_w = float(np.float32(-1.0) / np.float32(mesh_scale) / np.float32(2.0))   # left face centre (-0.5/ms, 0, 0)
    x_t = 0.0 - extend_pixel                                                    # ... lands on pixel -extend_pixel
    distance = f_px * x_w / (x_t - image_resolution / 2.0)
    return distance, f_px


# ---------------------------------------------------------------------------------------------------------
# Blender cameras -> pinhole intrinsics
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of an image of `width` x `height` (x right, y down, square pixels)."""
    width: int
    height: int
    focal: float          # pixels
    cx: float             # principal point, pixels from the left edge
    cy: float             # principal point, pixels from the top edge

    @property
    def hfov(self) -> float:
        return fov_from_focal(self.focal, self.width)

    @property
    def shift(self) -> tuple[float, float]:
        """Principal-point offset as a Blender AUTO-fit shift (units of max(width, height), y up)."""
        m = float(max(self.width, self.height))
        return (self.width / 2.0 - self.cx) / m, (self.cy - self.height / 2.0) / m

    @staticmethod
    def from_hfov(width: int, height: int, hfov: float, shift_x: float = 0.0, shift_y: float = 0.0) -> "Intrinsics":
        """The wire format's camera: horizontal FOV over `width` and a shift in units of max(width, height)
        (Blender's AUTO sensor fit convention: +shift_x moves the image window right, +shift_y up, so the
        principal point sits at (W/2 - shift_x m, H/2 + shift_y m) in pixels, y down)."""
        if not (0.0 < hfov < math.pi):
            raise ValueError(f"horizontal FOV must be in (0, pi) radians, got {hfov}")
        m = float(max(width, height))
        return Intrinsics(width, height, focal_pixels(hfov, width),
                          width / 2.0 - shift_x * m, height / 2.0 + shift_y * m)


def blender_intrinsics(lens: float, sensor_width: float, sensor_height: float, sensor_fit: str,
                       res_x: int, res_y: int, shift_x: float = 0.0, shift_y: float = 0.0) -> Intrinsics:
    """Intrinsics of a Blender perspective camera rendered at res_x x res_y with square pixels.

    Mirrors Blender's view-plane computation: AUTO fits `sensor_width` to the larger image side, HORIZONTAL
    fits `sensor_width` to the width, VERTICAL fits `sensor_height` to the height; shifts are in units of that
    fitted side.
    """
    fit = sensor_fit.upper()
    if fit == "AUTO":
        sensor, fitted = sensor_width, float(max(res_x, res_y))
    elif fit == "HORIZONTAL":
        sensor, fitted = sensor_width, float(res_x)
    elif fit == "VERTICAL":
        sensor, fitted = sensor_height, float(res_y)
    else:
        raise ValueError(f"unknown sensor fit {sensor_fit!r}")
    focal = lens / sensor * fitted
    # A positive shift moves the image window right/up, so the optical axis lands left of/below the centre.
    return Intrinsics(res_x, res_y, focal, res_x / 2.0 - shift_x * fitted, res_y / 2.0 + shift_y * fitted)


# ---------------------------------------------------------------------------------------------------------
# Placement of the generated object in the source camera
# ---------------------------------------------------------------------------------------------------------

def crop_distance(fov: float, mesh_scale: float = 1.0) -> float:
    """Camera distance of a conditioning crop: the official heuristic `distance_from_fov` (the model cube's
    mid-depth cross-section spans the crop) in float64."""
    return 0.5 / (mesh_scale * math.tan(fov / 2.0))


@dataclass(frozen=True)
class CropCamera:
    """The conditioning camera of one generation: the square crop of side `crop_size` pixels centred at
    (`crop_cx`, `crop_cy`) in an image with intrinsics `source`. The model sees the crop as a centred pinhole
    of FOV `fov`; in the source camera the crop is an off-axis window, so its frustum is the centred one
    sheared by (`shear_x`, `shear_y`) (camera-local x += shear_x * z, y += shear_y * z)."""
    fov: float
    distance: float
    shear_x: float
    shear_y: float

    @staticmethod
    def from_crop(source: Intrinsics, crop_cx: float, crop_cy: float, crop_size: float,
                  mesh_scale: float = 1.0) -> "CropCamera":
        fov = 2.0 * math.atan(crop_size / (2.0 * source.focal))
        # Derivation: the model projects camera-local p to crop pixel u_m = f x / -z + S/2; that pixel is
        # u = u_m + crop_cx - S/2 in the source image, which the source camera produces from
        # x' = x - (crop_cx - cx) / f * z. Likewise v (image y down, camera y up): y' = y + (crop_cy - cy) / f * z.
        return CropCamera(fov=fov, distance=crop_distance(fov, mesh_scale),
                          shear_x=-(crop_cx - source.cx) / source.focal,
                          shear_y=(crop_cy - source.cy) / source.focal)

    def shear_matrix(self) -> np.ndarray:
        """4x4 camera-local shear from the centred crop frustum to the source camera's frustum."""
        m = np.eye(4)
        m[0, 2] = self.shear_x
        m[1, 2] = self.shear_y
        return m

    def model_to_camera(self, mesh_scale: float = 1.0) -> np.ndarray:
        """4x4 affine: model-frame point -> source camera-local point (OpenGL/Blender camera axes)."""
        centred = np.eye(4)
        centred[:3, :3] /= mesh_scale
        centred[2, 3] = -self.distance
        return self.shear_matrix() @ centred

    def glb_to_camera(self, mesh_scale: float = 1.0) -> np.ndarray:
        """4x4 affine: official-GLB-frame point -> source camera-local point (the result's transform)."""
        to_model = np.eye(4)
        to_model[:3, :3] = R_MODEL_TO_GLB.T
        return self.model_to_camera(mesh_scale) @ to_model


def split_placement(glb_to_camera: np.ndarray, depth_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Splits a GLB->camera affine into what Blender can hold.

    Returns (mesh_matrix, object_in_camera): mesh data is stored in Blender's import frame `b` of the GLB,
    pre-multiplied by `mesh_matrix` (which carries any shear, since an object transform cannot); the object's
    matrix relative to the camera object is `object_in_camera` (rotation, translation and the uniform
    `depth_scale` about the camera centre, which keeps the reprojection).
    """
    b_to_glb = np.eye(4)
    b_to_glb[:3, :3] = R_GLB_TO_BLENDER.T
    b_to_camera = glb_to_camera @ b_to_glb            # = Shear @ Rigid
    # The rigid part sends the model origin to (0, 0, -d); the shear moves it to (-sx d, -sy d, -d).
    t = b_to_camera[:3, 3]
    d = -t[2]
    shear = np.eye(4)
    shear[0, 2] = -t[0] / d
    shear[1, 2] = -t[1] / d
    rigid = np.linalg.inv(shear) @ b_to_camera
    object_in_camera = np.diag([depth_scale, depth_scale, depth_scale, 1.0]) @ rigid
    mesh_matrix = np.linalg.inv(rigid) @ shear @ rigid   # rigid @ mesh_matrix == shear @ rigid
    return mesh_matrix, object_in_camera


def rebase_view(c2w_main: np.ndarray, c2w_view: np.ndarray) -> np.ndarray:
    """Multi-view re-basing (spec §3.2): `F(d_0) @ inv(C_0) @ C_i` with d_0 = |C_0 translation|, so the view
    is expressed in the front-view frame of the main view 0."""
    d0 = float(np.linalg.norm(np.asarray(c2w_main)[:3, 3]))
    return front_view_c2w(d0) @ np.linalg.inv(np.asarray(c2w_main)) @ np.asarray(c2w_view)


# ---------------------------------------------------------------------------------------------------------
# Multi-view: several source cameras, each with its own crop, conditioning one model frame
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewCamera:
    """The conditioning camera of one square crop, as the projection grid takes it (`conditioning.proj_grid`).

    `fov` is the crop's horizontal (= vertical) field of view in radians. Without `c2w` the camera is the
    official front view at `distance`; with `c2w` (a 4x4 camera-to-world in the grid's Blender-style world,
    possibly sheared: see `MultiViewRig`) `distance` is not used. Grid points are `R_MODEL_TO_WORLD @ v /
    mesh_scale`.
    """
    fov: float
    distance: float | None = None
    mesh_scale: float = 1.0
    c2w: np.ndarray | None = None


MIN_RAY_SPREAD = 1e-3    # smallest eigenvalue of the ray-fit normal matrix (~2.5 degrees between two rays)


def crop_centre_ray(c2w: np.ndarray, crop: CropCamera) -> tuple[np.ndarray, np.ndarray]:
    """(origin, unit direction) in world of the ray through the centre of `crop`, for a source camera at `c2w`.
    The shear maps the crop's axis (0, 0, -1) to (-shear_x, -shear_y, -1) in the source camera."""
    c2w = np.asarray(c2w, dtype=np.float64)
    direction = c2w[:3, :3] @ np.array([-crop.shear_x, -crop.shear_y, -1.0])
    return c2w[:3, 3].copy(), direction / np.linalg.norm(direction)


def closest_point_to_rays(origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """The point with the least summed squared distance to the lines `origins[i] + t directions[i]` (unit
    directions). Raises ValueError when the lines are (nearly) parallel, since the point is then undetermined."""
    normal = np.zeros((3, 3))
    rhs = np.zeros(3)
    for o, d in zip(np.asarray(origins, dtype=np.float64), np.asarray(directions, dtype=np.float64)):
        across = np.eye(3) - np.outer(d, d)             # projects onto the plane perpendicular to the line
        normal += across
        rhs += across @ o
    if np.linalg.eigvalsh(normal)[0] < MIN_RAY_SPREAD:
        raise ValueError("the cameras look at the object from (nearly) the same direction, so where it is in "
                         "depth cannot be told; move them further apart around the object")
    return np.linalg.solve(normal, rhs)


@dataclass(frozen=True)
class MultiViewRig:
    """Several source cameras (`c2ws`, Blender camera-to-world, scene units), each seeing the object through its
    own crop camera (`crops`), conditioning one model frame: view 0's crop frame (spec §3.2: view 0 is the main
    view and every view is re-based onto it).

    Scale. One view fixes the object only up to a scale about the camera centre, so a single crop frame is in
    "crop units" (the object at `crops[0].distance`). Several posed cameras fix it: the object centre is where
    the crops' centre rays meet (least squares), at depth `D` in view 0, and one model unit is
    `scale = D / crops[0].distance` scene units. With one view `scale` is 1 and nothing changes.

    Conditioning cameras. A model point `v` is at view 0's centred crop point `c0 = v - (0, 0, d0)`, i.e. at
    `scale * Sh0 c0` in view 0's source camera (`Sh` = a crop's shear), at `C0 scale Sh0 c0` in the world, and at
    `inv(Sh_i) inv(C_i) C0 scale Sh0 c0` in view i's centred crop. In the grid's world (`w = R v / mesh_scale`,
    view 0 the front view) that is the camera-to-world

        c2w_i = F(D) @ inv(Sh0) @ inv(C0) @ C_i @ Sh_i      with mesh_scale = d0 / D = 1 / scale,

    the official `calc_mat_i = F(d_0) @ inv(C_0) @ C_i` (`rebase_view`) whenever the crops are centred (no
    shear) and the object centre is the world origin (the official rig: cameras looking at the origin), so that
    D = |C0 translation|. View 0's own camera is the front view at `D` (exactly the single-view camera for N=1).
    """
    crops: tuple[CropCamera, ...]
    c2ws: tuple[np.ndarray, ...]
    scale: float

    @staticmethod
    def from_views(crops, c2ws) -> "MultiViewRig":
        crops = tuple(crops)
        c2ws = tuple(np.asarray(c, dtype=np.float64) for c in c2ws)
        if len(crops) != len(c2ws) or not crops:
            raise ValueError(f"{len(crops)} crops for {len(c2ws)} cameras")
        if len(crops) == 1:
            return MultiViewRig(crops, c2ws, 1.0)
        rays = [crop_centre_ray(c, crop) for c, crop in zip(c2ws, crops)]
        centre = closest_point_to_rays(*zip(*rays))
        for i, (c2w, (origin, direction)) in enumerate(zip(c2ws, rays)):
            if (centre - origin) @ direction <= 0.0:
                raise ValueError(f"the object is behind camera {i}: the cameras' lines of sight through the object "
                                 "do not meet in front of every camera")
        depth = -(np.linalg.inv(c2ws[0]) @ np.append(centre, 1.0))[2]
        return MultiViewRig(crops, c2ws, float(depth / crops[0].distance))

    @property
    def depth(self) -> float:
        """D: depth of the model origin in view 0, scene units."""
        return self.scale * self.crops[0].distance

    def grid_cameras(self) -> list[ViewCamera]:
        """The conditioning camera of every view, in view order (see the class docstring)."""
        main = self.crops[0]
        mesh_scale = 1.0 / self.scale
        cameras = [ViewCamera(main.fov, distance=self.depth, mesh_scale=mesh_scale)]
        to_main = front_view_c2w(self.depth) @ np.linalg.inv(main.shear_matrix()) @ np.linalg.inv(self.c2ws[0])
        for crop, c2w in zip(self.crops[1:], self.c2ws[1:]):
            cameras.append(ViewCamera(crop.fov, mesh_scale=mesh_scale, c2w=to_main @ c2w @ crop.shear_matrix()))
        return cameras

    def glb_to_camera(self) -> np.ndarray:
        """4x4: official-GLB-frame point -> view 0's source camera, in scene units (`CropCamera.glb_to_camera`
        scaled about the camera centre)."""
        return np.diag([self.scale, self.scale, self.scale, 1.0]) @ self.crops[0].glb_to_camera()

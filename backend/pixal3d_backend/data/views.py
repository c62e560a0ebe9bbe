"""Views of a procedural object in the training relation of the official data (spec §2.3).

The render camera is always the canonical front camera of the model frame (on +z_v at distance `d`, looking
along -z_v, +y_v up; `camera.py`). A view therefore poses the *object*: the normalised object is rotated
into the camera-aligned frame and rescaled so its largest coordinate is 0.49999 again (no re-centring), as
the official data toolkit does with its meshes. The camera is the inference heuristic
`d = distance_from_fov(fov, mesh_scale)` with `mesh_scale = 1`, moved back only as far as needed when a near
part of the object would otherwise leave the frame (wide FOVs magnify what is close to the camera).

`crop_view` turns such a render view into the view our default model is trained on: the one inference builds
from a photo. Inference crops the image to 1.1x the object's box and conditions on that crop's own pinhole at
the "object fills the frame" distance (`camera.CropCamera`), whatever the photo's FOV; training on whole renders
at their own FOV taught the model a different camera relation than the one it is used with (the first default
model stretched objects in depth). A crop view is a camera turned about its centre to look at the middle of the
object's box, with the crop's FOV and distance, and the object scaled about the camera centre (which keeps the
image) so its depth range is centred in the model cube: `v = scale R x + translation`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import camera
from ..conditioning.preprocess import CROP_MARGIN

NORMALISED_EXTENT = 0.49999          # official: meshes are scaled by 0.49999 / abs_max
FOV_RANGE_DEGREES = (10.0, 70.0)     # official training renders (spec §4.6)


@dataclass(frozen=True)
class Lighting:
    """Directional lights (unit vectors towards the light, camera/model frame) and a hemisphere ambient
    term between `ground` and `sky` around the object's up axis. Radiances are linear RGB."""
    directions: np.ndarray     # [L,3]
    radiances: np.ndarray      # [L,3]
    sky: np.ndarray            # [3]
    ground: np.ndarray         # [3]


@dataclass(frozen=True)
class View:
    rotation: np.ndarray       # [3,3] normalised object frame -> model frame
    scale: float               # model point = scale * rotation @ normalised point + translation
    fov: float                 # horizontal (= vertical) field of view, radians
    distance: float            # camera distance in camera units (p_cam = v / mesh_scale - (0, 0, distance))
    lighting: Lighting
    mesh_scale: float = 1.0
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def model_points(self, points: np.ndarray) -> np.ndarray:
        """Normalised-object points [N, 3] -> this view's model frame."""
        return self.scale * points @ self.rotation.T + self.translation


def rotation_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_rotation(azimuth: float, elevation: float, roll: float = 0.0) -> np.ndarray:
    """Object -> camera-aligned frame for a camera orbiting the object's up axis (+y): turn the object by
    `azimuth` about +y, then tip its top towards the camera (+z) by `elevation` (camera looking down)."""
    return rotation_z(roll) @ rotation_x(elevation) @ rotation_y(azimuth)


def fit_scale(surface_points: np.ndarray, rotation: np.ndarray) -> float:
    """The official normalisation of a rotated object: largest absolute coordinate -> 0.49999."""
    return NORMALISED_EXTENT / float(np.abs(surface_points @ rotation.T).max())


def framing_distance(model_points: np.ndarray, fov: float, mesh_scale: float = 1.0,
                     margin: float = 0.02) -> float:
    """The heuristic distance, or the smallest larger one that keeps every point inside the frame with a
    `margin` (fraction of the half image) — |x|, |y| <= (1 - margin) tan(fov/2) (d ms - z)."""
    heuristic = camera.distance_from_fov(fov, mesh_scale=mesh_scale)[0]
    t = (1.0 - margin) * math.tan(fov / 2.0)
    lateral = np.abs(model_points[:, :2]).max(axis=1)
    needed = float(((lateral / t + model_points[:, 2]) / mesh_scale).max())
    return max(heuristic, needed)


def random_lighting(rng: np.random.Generator) -> Lighting:
    """A key light from the camera's side of the object, 0-2 fill/rim lights, a tinted sky and ground."""
    count = int(rng.integers(1, 4))
    directions, radiances = [], []
    for i in range(count):
        if i == 0:   # key: above-front, off to a side
            d = np.array([rng.uniform(-1, 1), rng.uniform(0.2, 1.2), rng.uniform(0.4, 1.2)])
        else:        # fill or rim: anywhere
            d = rng.normal(size=3)
        directions.append(d / np.linalg.norm(d))
        tint = 1.0 + rng.normal(0.0, 0.08, 3)
        radiances.append(math.pi * (rng.uniform(0.7, 1.1) if i == 0 else rng.uniform(0.15, 0.5)) * tint)
    sky = rng.uniform(0.15, 0.45) * (1.0 + rng.normal(0.0, 0.1, 3))
    ground = sky * rng.uniform(0.2, 0.6)
    return Lighting(np.array(directions), np.clip(np.array(radiances), 0, None), np.clip(sky, 0, None),
                    np.clip(ground, 0, None))


def random_view(surface_points: np.ndarray, rng: np.random.Generator,
                fov_range_degrees: tuple[float, float] = FOV_RANGE_DEGREES,
                elevation_range_degrees: tuple[float, float] = (-20.0, 60.0)) -> View:
    """A random view of an object given points on its (normalised) surface."""
    rotation = camera_rotation(rng.uniform(0.0, 2.0 * math.pi),
                               math.radians(rng.uniform(*elevation_range_degrees)),
                               math.radians(rng.normal(0.0, 4.0)))
    scale = fit_scale(surface_points, rotation)
    fov = math.radians(rng.uniform(*fov_range_degrees))
    distance = framing_distance(scale * surface_points @ rotation.T, fov)
    return View(rotation, scale, fov, distance, random_lighting(rng))


def _rotation_onto_axis(direction: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the unit vector `direction` onto -z (the viewing axis)."""
    target = np.array([0.0, 0.0, -1.0])
    axis = np.cross(direction, target)
    sin, cos = np.linalg.norm(axis), float(direction @ target)
    if sin < 1e-12:
        return np.eye(3)
    k = axis / sin
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + sin * cross + (1.0 - cos) * cross @ cross


def _image_box(camera_points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (x right, y up) and longer side of the points' image box, in units of the focal length."""
    tangent = camera_points[:, :2] / -camera_points[:, 2:]
    lo, hi = tangent.min(0), tangent.max(0)
    return (lo + hi) / 2.0, float((hi - lo).max())


def crop_view(view: View, surface_points: np.ndarray, margin: float = CROP_MARGIN,
              extent: float = NORMALISED_EXTENT) -> View:
    """The view inference builds from a render of `view` (module docstring): camera turned to the centre of the
    object's image box (iterated: turning moves the box a little), FOV of a square crop `margin` times the box's
    longer side, `camera.crop_distance` of that FOV, and the object scaled about the camera centre so its depth
    range is centred on z = 0 — as far as the model cube (`extent`) allows. `surface_points` are normalised-object
    points on the surface (their image box stands for the silhouette's)."""
    if view.mesh_scale != 1.0:
        raise ValueError("crop views are defined for mesh_scale 1")
    p = view.model_points(surface_points) - np.array([0.0, 0.0, view.distance])     # render camera-local
    turn = np.eye(3)
    for _ in range(3):
        centre, _ = _image_box(p @ turn.T)
        direction = np.array([centre[0], centre[1], -1.0])
        turn = _rotation_onto_axis(direction / np.linalg.norm(direction)) @ turn
    q = p @ turn.T
    _, side = _image_box(q)
    fov = 2.0 * math.atan(margin * side / 2.0)
    distance = camera.crop_distance(fov)
    # model point v = k q + (0, 0, d): keep |v_x|, |v_y| <= extent and -extent <= v_z <= extent
    depth = -q[:, 2]
    k = distance / ((depth.min() + depth.max()) / 2.0)
    k_max = min(extent / np.abs(q[:, :2]).max(), (distance + extent) / depth.max())
    k_min = (distance - extent) / depth.min()
    k = min(max(k, k_min), k_max)
    translation = np.array([0.0, 0.0, distance]) + k * turn @ (view.translation - np.array([0.0, 0.0, view.distance]))
    return View(turn @ view.rotation, k * view.scale, fov, distance, view.lighting, 1.0, translation)

"""Views of a procedural object in the training relation of the official data (spec §2.3).

The render camera is always the canonical front camera of the model frame (on +z_v at distance `d`, looking
along -z_v, +y_v up; `camera.py`). A view therefore poses the *object*: the normalised object is rotated
into the camera-aligned frame and rescaled so its largest coordinate is 0.49999 again (no re-centring), as
the official data toolkit does with its meshes. The camera is the inference heuristic
`d = distance_from_fov(fov, mesh_scale)` with `mesh_scale = 1`, moved back only as far as needed when a near
part of the object would otherwise leave the frame (wide FOVs magnify what is close to the camera).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import camera

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
    scale: float               # model point = scale * rotation @ normalised point
    fov: float                 # horizontal (= vertical) field of view, radians
    distance: float            # camera distance in camera units (p_cam = v / mesh_scale - (0, 0, distance))
    lighting: Lighting
    mesh_scale: float = 1.0


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

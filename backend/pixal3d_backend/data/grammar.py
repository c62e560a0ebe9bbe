"""A grammar of object-like CSG compositions, deterministic from an integer seed.

`make_object(seed)` draws a category and builds the object in raw units (y up, resting near y = 0), then
normalises it: centred on its bounding box and scaled so its largest coordinate is 0.49999 (spec §2.3).
All randomness comes from `numpy.random.default_rng(seed)`, so an object is the same on every machine.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .grid import project_to_surface, support, surface_voxels, voxel_centers
from .materials import Material, random_material
from .shapes import ObjectField, Part, ProceduralObject
from .views import NORMALISED_EXTENT, rotation_x, rotation_y, rotation_z

CATEGORIES = ("table", "chair", "mug", "lamp", "bottle", "vehicle", "creature", "token", "blob")
_CATEGORY_WEIGHTS = (0.11, 0.11, 0.09, 0.1, 0.11, 0.1, 0.12, 0.08, 0.18)


class _Builder:
    """Accumulates parts and materials of one object."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.parts: list[Part] = []
        self.materials: list[Material] = []

    def material(self) -> int:
        self.materials.append(random_material(self.rng))
        return len(self.materials) - 1

    def add(self, primitive: str, params, at=(0.0, 0.0, 0.0), rotation: np.ndarray | None = None,
            scale: float = 1.0, operation: str = "union", blend: float = 0.0, material: int = 0,
            profile=None) -> None:
        rotation = np.eye(3) if rotation is None else rotation
        self.parts.append(Part(
            primitive, tuple(float(x) for x in np.atleast_1d(params)),
            tuple(float(x) for x in rotation.reshape(-1)), tuple(float(x) for x in at), float(scale),
            operation, float(blend), material,
            None if profile is None else tuple((float(x), float(y)) for x, y in profile)))

    def leg(self, top: np.ndarray, bottom: np.ndarray, radius: float, material: int, kind: str) -> None:
        """A straight leg between two points: cylinder, square box, capsule or tapered cone."""
        axis = top - bottom
        length = float(np.linalg.norm(axis))
        rotation = _rotation_from_y(axis / length)
        center, h = (top + bottom) / 2.0, length / 2.0
        if kind == "box":
            self.add("box", [radius, h, radius], center, rotation, material=material)
        elif kind == "capsule":
            self.add("capsule", [max(h - radius, 1e-3), radius], center, rotation, material=material)
        elif kind == "cone":
            self.add("cone", [h, radius * 0.6, radius], center, rotation, material=material)
        else:
            self.add("cylinder", [radius, h], center, rotation, material=material)


def _rotation_from_y(direction: np.ndarray) -> np.ndarray:
    """A rotation taking +y to `direction` (Rodrigues about y x direction)."""
    y = np.array([0.0, 1.0, 0.0])
    v, c = np.cross(y, direction), float(np.dot(y, direction))
    if np.linalg.norm(v) < 1e-9:
        return np.eye(3) if c > 0 else rotation_x(math.pi)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


# --------------------------------------------------------------------------------------------------------
# Categories (raw units: roughly a metre-scale object with y up)
# --------------------------------------------------------------------------------------------------------

def _table(b: _Builder) -> None:
    r = b.rng
    top, legs = b.material(), b.material()
    width, depth, height = r.uniform(0.8, 1.8), r.uniform(0.5, 1.0), r.uniform(0.45, 1.0)
    thickness = r.uniform(0.03, 0.09)
    round_top = r.random() < 0.3
    if round_top:
        b.add("cylinder", [width / 2, thickness / 2], (0, height, 0), material=top)
    else:
        b.add("rounded_box", [width / 2, thickness / 2, depth / 2, thickness * r.uniform(0.1, 0.45)],
              (0, height, 0), material=top)
    if round_top or r.random() < 0.25:   # pedestal: a lathed column and foot
        rc, rf = r.uniform(0.03, 0.08), r.uniform(0.15, 0.35) * width
        profile = [(0, 0), (rf, 0), (rf, 0.03), (rc * 1.5, 0.08), (rc, 0.15), (rc, height - 0.05),
                   (rc * 2.0, height - thickness / 2), (0, height - thickness / 2)]
        b.add("lathe", [], profile=profile, material=legs)
        return
    kind = str(r.choice(["cylinder", "box", "cone", "capsule"]))
    inset, radius, splay = r.uniform(0.03, 0.15), r.uniform(0.02, 0.05), r.uniform(0.0, 0.08)
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (width / 2 - inset), sz * (depth / 2 - inset)
            b.leg(np.array([x, height, z]), np.array([x + sx * splay, 0.0, z + sz * splay]), radius, legs, kind)
    if r.random() < 0.4:   # a lower shelf or stretcher
        b.add("box", [width / 2 - inset, 0.015, depth / 2 - inset], (0, height * r.uniform(0.15, 0.4), 0),
              material=top)


def _chair(b: _Builder) -> None:
    r = b.rng
    seat, frame = b.material(), b.material()
    width, depth, seat_h = r.uniform(0.4, 0.6), r.uniform(0.4, 0.6), r.uniform(0.4, 0.5)
    th = r.uniform(0.03, 0.08)
    b.add("rounded_box", [width / 2, th / 2, depth / 2, th * 0.4], (0, seat_h, 0), material=seat)
    kind = str(r.choice(["cylinder", "box", "cone"]))
    radius = r.uniform(0.015, 0.035)
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (width / 2 - 0.04), sz * (depth / 2 - 0.04)
            b.leg(np.array([x, seat_h, z]), np.array([x, 0.0, z]), radius, frame, kind)
    back_h, tilt = r.uniform(0.3, 0.6), r.uniform(0.0, 0.25)
    back_center = np.array([0.0, seat_h + back_h / 2, -depth / 2 - math.sin(tilt) * back_h / 2])
    b.add("rounded_box", [width / 2, back_h / 2, th / 2, th * 0.4], back_center, rotation_x(-tilt), material=seat)
    if r.random() < 0.5:   # carved slats in the backrest
        slats = int(r.integers(2, 5))
        for i in range(slats):
            x = (i + 0.5) / slats * width - width / 2
            b.add("box", [width / slats * 0.25, back_h * 0.35, th], back_center + np.array([x, 0, 0]),
                  rotation_x(-tilt), operation="subtract", material=seat)
    if r.random() < 0.35:  # armrests
        for sx in (-1, 1):
            b.add("capsule", [depth * 0.4, 0.02], (sx * width / 2, seat_h + 0.22, 0), rotation_x(math.pi / 2),
                  material=frame)
            b.leg(np.array([sx * width / 2, seat_h + 0.22, depth * 0.35]),
                  np.array([sx * width / 2, seat_h, depth * 0.35]), 0.015, frame, "cylinder")


def _mug(b: _Builder) -> None:
    r = b.rng
    body, inside = b.material(), b.material()
    radius, height = r.uniform(0.3, 0.5), r.uniform(0.6, 1.2)
    wall = r.uniform(0.03, 0.07)
    if r.random() < 0.5:
        b.add("cylinder", [radius, height / 2], (0, height / 2, 0), material=body)
    else:
        b.add("cone", [height / 2, radius * r.uniform(0.7, 0.95), radius], (0, height / 2, 0), material=body)
    handle_r = r.uniform(0.18, 0.3) * height
    b.add("torus", [handle_r, r.uniform(0.025, 0.05)], (radius + handle_r * 0.5, height * 0.55, 0),
          rotation_x(math.pi / 2), scale=1.0, material=body)
    b.add("cylinder", [radius - wall, height / 2], (0, height / 2 + wall * 1.5, 0), operation="subtract",
          material=inside)


def _lamp(b: _Builder) -> None:
    r = b.rng
    base, pole, shade = b.material(), b.material(), b.material()
    base_r, height = r.uniform(0.15, 0.3), r.uniform(0.6, 1.5)
    b.add("cylinder", [base_r, 0.025], (0, 0.025, 0), material=base)
    if r.random() < 0.5:   # straight pole with a conical shade
        b.add("cylinder", [0.015, height / 2], (0, height / 2, 0), material=pole)
        top = np.array([0.0, height, 0.0])
        shade_axis = np.eye(3)
    else:                  # two-segment arm ending in a tilted shade
        elbow = np.array([r.uniform(-0.1, 0.1), height * r.uniform(0.5, 0.7), 0.0])
        top = np.array([r.uniform(0.2, 0.45), height, 0.0])
        b.leg(elbow, np.zeros(3), 0.015, pole, "capsule")
        b.leg(top, elbow, 0.015, pole, "capsule")
        b.add("sphere", [0.03], elbow, material=pole)
        shade_axis = rotation_z(-r.uniform(0.3, 1.0))
    h, r_low, r_top = r.uniform(0.12, 0.25), r.uniform(0.15, 0.3), r.uniform(0.06, 0.15)
    center = top - shade_axis @ np.array([0.0, h * 0.5, 0.0])
    b.add("cone", [h, r_low, r_top], center, shade_axis, material=shade)
    b.add("cone", [h * 1.02, r_low - 0.01, r_top - 0.01], center - shade_axis @ np.array([0, 0.02, 0]),
          shade_axis, operation="subtract", material=shade)
    b.add("sphere", [r.uniform(0.04, 0.07)], center, material=b.material())


def _bottle(b: _Builder) -> None:
    r = b.rng
    glass, cap = b.material(), b.material()
    radius, body_h = r.uniform(0.12, 0.3), r.uniform(0.4, 0.9)
    neck_r, neck_h, shoulder = radius * r.uniform(0.25, 0.5), r.uniform(0.08, 0.3), r.uniform(0.05, 0.25)
    bulge = r.uniform(0.8, 1.25)
    profile = [(0.0, 0.0), (radius * 0.9, 0.0), (radius, 0.03), (radius * bulge, body_h * 0.5),
               (radius, body_h), (neck_r, body_h + shoulder), (neck_r, body_h + shoulder + neck_h),
               (0.0, body_h + shoulder + neck_h)]
    b.add("lathe", [], profile=profile, material=glass)
    top = body_h + shoulder + neck_h
    if r.random() < 0.7:
        b.add("cylinder", [neck_r * 1.15, 0.03], (0, top + 0.02, 0), material=cap)
    if r.random() < 0.4:   # a label band
        b.add("cylinder", [radius * max(bulge, 1.0) * 1.01, body_h * 0.2], (0, body_h * 0.5, 0),
              material=b.material())


def _vehicle(b: _Builder) -> None:
    r = b.rng
    paint, tyre, glass = b.material(), b.material(), b.material()
    length, width, body_h = r.uniform(1.2, 2.2), r.uniform(0.6, 1.0), r.uniform(0.25, 0.45)
    wheel_r = r.uniform(0.15, 0.25)
    clearance = wheel_r * r.uniform(0.6, 1.0)
    body_y = clearance + body_h / 2
    b.add("rounded_box", [length / 2, body_h / 2, width / 2, body_h * r.uniform(0.15, 0.45)], (0, body_y, 0),
          material=paint)
    cabin_h, cabin_l = r.uniform(0.2, 0.4), length * r.uniform(0.35, 0.6)
    front, rear = cabin_l / 2 * r.uniform(0.4, 0.9), cabin_l / 2 * r.uniform(0.6, 1.0)
    profile = [(-cabin_l / 2, 0.0), (cabin_l / 2, 0.0), (front, cabin_h), (-rear, cabin_h)]
    b.add("extrusion", [width / 2 * 0.9], (r.uniform(-0.15, 0.1) * length, body_y + body_h / 2 - 0.01, 0),
          profile=profile, material=glass, operation="smooth_union", blend=0.03)
    for sx in (-1, 1):
        for sz in (-1, 1):
            at = (sx * length * 0.32, wheel_r, sz * width / 2)
            b.add("cylinder", [wheel_r * 1.15, width * 0.12], at, rotation_x(math.pi / 2),
                  operation="subtract", material=paint)
            if r.random() < 0.5:
                b.add("torus", [wheel_r * 0.7, wheel_r * 0.3], at, rotation_x(math.pi / 2), material=tyre)
            else:
                b.add("cylinder", [wheel_r, width * 0.08], at, rotation_x(math.pi / 2), material=tyre)
    if r.random() < 0.3:   # spoiler
        b.add("box", [0.03, 0.02, width / 2], (-length / 2 + 0.05, body_y + body_h / 2 + 0.1, 0), material=paint)
        b.leg(np.array([-length / 2 + 0.05, body_y + body_h / 2 + 0.1, 0.0]),
              np.array([-length / 2 + 0.05, body_y + body_h / 2 - 0.02, 0.0]), 0.02, paint, "box")


def _creature(b: _Builder) -> None:
    r = b.rng
    skin, eye, accent = b.material(), b.material(), b.material()
    body = np.array([r.uniform(0.3, 0.6), r.uniform(0.2, 0.4), r.uniform(0.2, 0.35)])
    legs = int(r.choice([2, 4, 6]))
    leg_len = r.uniform(0.2, 0.5)
    body_y = leg_len + body[1] * 0.6
    b.add("ellipsoid", body, (0, body_y, 0), material=skin)
    blend = r.uniform(0.04, 0.12)
    head_r = r.uniform(0.12, 0.25)
    head = np.array([body[0] + head_r * 0.5, body_y + body[1] * r.uniform(0.3, 1.0), 0.0])
    b.add("sphere", [head_r], head, operation="smooth_union", blend=blend, material=skin)
    for i in range(legs // 2):
        x = (i + 0.5) / (legs // 2) * body[0] * 1.4 - body[0] * 0.7 if legs > 2 else 0.0
        for sz in (-1, 1):
            hip = np.array([x, body_y - body[1] * 0.3, sz * body[2] * 0.6])
            foot = hip + np.array([r.uniform(-0.05, 0.05), -(body_y - body[1] * 0.3), sz * r.uniform(0.0, 0.1)])
            b.add("capsule", [np.linalg.norm(foot - hip) / 2, r.uniform(0.03, 0.07)], (hip + foot) / 2,
                  _rotation_from_y((hip - foot) / np.linalg.norm(hip - foot)), operation="smooth_union",
                  blend=blend * 0.5, material=skin)
    for sz in (-1, 1):
        eye_at = head + head_r * np.array([0.7, 0.35, sz * 0.45])
        b.add("sphere", [head_r * r.uniform(0.15, 0.3)], eye_at, material=eye)
        if r.random() < 0.5:   # ears or horns
            b.add("cone", [head_r * 0.4, head_r * 0.25, 0.005], head + head_r * np.array([0.0, 0.9, sz * 0.5]),
                  rotation_x(sz * 0.4), material=accent)
    if r.random() < 0.7:       # tail
        tail = np.array([-body[0] * 1.1, body_y + 0.05, 0.0])
        b.add("capsule", [r.uniform(0.1, 0.3), 0.03], tail, rotation_z(r.uniform(0.6, 1.3)),
              operation="smooth_union", blend=blend * 0.5, material=accent)


def _token(b: _Builder) -> None:
    """An extruded 2-D profile (star, polygon, irregular outline), sometimes pierced and rounded."""
    r = b.rng
    kind = r.integers(3)
    n = int(r.integers(3, 9))
    angles = np.arange(n) / n * 2 * math.pi
    if kind == 0:      # star
        inner = r.uniform(0.3, 0.7)
        angles = np.arange(2 * n) / (2 * n) * 2 * math.pi
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    elif kind == 1:    # regular polygon
        radii = np.ones(n)
    else:              # irregular outline
        n = int(r.integers(5, 12))
        angles = np.sort(r.uniform(0, 2 * math.pi, n))
        radii = r.uniform(0.5, 1.0, n)
    profile = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1) * 0.5
    depth = r.uniform(0.05, 0.4)
    mat = b.material()
    b.add("extrusion", [depth / 2], (0, 0.5, 0), rotation_y(r.uniform(0, math.pi)), profile=profile, material=mat)
    if r.random() < 0.5:
        b.add("cylinder", [r.uniform(0.05, 0.15), depth], (0, 0.5, 0), rotation_x(math.pi / 2),
              operation="subtract", material=b.material())
    if r.random() < 0.3:  # rounded edges by intersecting with a large sphere
        b.add("sphere", [r.uniform(0.5, 0.7)], (0, 0.5, 0), operation="intersect", material=mat)


def _blob(b: _Builder) -> None:
    """Generic random compositions of any primitives and operators."""
    r = b.rng
    count = int(r.integers(2, 8))
    mats = [b.material() for _ in range(int(r.integers(1, 4)))]
    for i in range(count):
        kind = str(r.choice(["sphere", "box", "rounded_box", "ellipsoid", "cylinder", "capsule", "torus", "cone"]))
        s = r.uniform(0.15, 0.4)
        params = {
            "sphere": [s], "box": r.uniform(0.3, 1.0, 3) * s,
            "rounded_box": np.append(r.uniform(0.4, 1.0, 3) * s, 0.1 * s),
            "ellipsoid": r.uniform(0.3, 1.0, 3) * s, "cylinder": [s * r.uniform(0.3, 1), s],
            "capsule": [s * r.uniform(0.3, 1), s * r.uniform(0.2, 0.5)],
            "torus": [s, s * r.uniform(0.1, 0.4)], "cone": [s, s * r.uniform(0.2, 1), s * r.uniform(0.0, 0.6)],
        }[kind]
        operation = "union" if i == 0 else str(r.choice(["smooth_union", "union", "subtract", "intersect"],
                                                          p=[0.5, 0.25, 0.2, 0.05]))
        at = r.normal(0, 0.2, 3) if i else np.zeros(3)
        if operation == "intersect":    # intersect with something big enough to keep most of the shape
            kind, params, at = "sphere", [r.uniform(0.4, 0.6)], r.normal(0, 0.1, 3)
        b.add(kind, params, at, _random_rotation(r), operation=operation, blend=r.uniform(0.03, 0.15),
              material=int(r.choice(mats)))


_BUILDERS = {"table": _table, "chair": _chair, "mug": _mug, "lamp": _lamp, "bottle": _bottle,
             "vehicle": _vehicle, "creature": _creature, "token": _token, "blob": _blob}


def build_raw_object(seed: int, category: str | None = None) -> ProceduralObject:
    """The un-normalised object of `seed` (the category is drawn from the seed unless given)."""
    rng = np.random.default_rng(seed)
    drawn = str(rng.choice(CATEGORIES, p=_CATEGORY_WEIGHTS))
    b = _Builder(rng)
    _BUILDERS[category or drawn](b)
    return ProceduralObject(tuple(b.parts), tuple(b.materials), category or drawn, seed)


def surface_samples(field: ObjectField, resolution: int = 64) -> torch.Tensor:
    """Points `[N,3]` on the object's surface: narrow-band voxel centres projected onto the zero set."""
    centres = voxel_centers(surface_voxels(field.sdf, resolution, field.device), resolution)
    points = project_to_surface(field.sdf, field.normals, centres)
    return points[field.sdf(points).abs() < 0.5 / resolution]


def normalise(obj: ProceduralObject, device: torch.device | str = "cpu", resolution: int = 64) -> ProceduralObject:
    """Centre the object on its bounding box and scale its largest coordinate to 0.49999 (the box is the
    support of the surface along the six axis directions)."""
    obj = obj.normalised(np.zeros(3), 0.5 / obj.bounding_radius())     # the bounding ball inside the cube
    field = obj.field(device)
    axes = torch.cat([torch.eye(3), -torch.eye(3)]).to(field.device)
    extent = support(field.sdf, field.normals, surface_samples(field, resolution), axes, 1.0 / resolution)
    lo, hi = -extent[3:].cpu().double().numpy(), extent[:3].cpu().double().numpy()
    raw_lo, raw_hi = lo / obj.scale, hi / obj.scale
    return obj.normalised((raw_lo + raw_hi) / 2.0, NORMALISED_EXTENT / float((raw_hi - raw_lo).max() / 2.0))


def make_object(seed: int, category: str | None = None, device: torch.device | str = "cpu") -> ProceduralObject:
    """The normalised procedural object of `seed` (deterministic; `device` only changes where it is measured)."""
    return normalise(build_raw_object(seed, category), device)

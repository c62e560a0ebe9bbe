"""Procedural objects as a flat CSG program of parts, and their evaluation on a device.

A `ProceduralObject` is plain Python data (a few hundred numbers), so thousands of them cost nothing; it is
compiled to an `ObjectField` on a device once, and that field evaluates distances, the winning part and PBR
attributes for millions of points per call. The program is a left fold: `d = op_k(d, part_k)`.

Frames: a part's local frame maps to raw object units by `x = scale * R @ x_local + t`; the object is then
normalised (`x_n = object.scale * (x - object.center)`) so that it fits [-0.5, 0.5]^3 with its largest
coordinate at 0.49999 (the official normalisation, spec §2.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from . import sdf
from .materials import ATTRIBUTE_CHANNELS, Material, evaluate_material

Tensor = torch.Tensor

OPERATIONS = ("union", "subtract", "intersect", "smooth_union")

# name -> (distance(p, params, profile), bounding radius of the local shape from (params, profile))
_PRIMITIVES: dict[str, tuple[Callable[[Tensor, Tensor, Tensor | None], Tensor],
                             Callable[[np.ndarray, np.ndarray | None], float]]] = {
    "sphere": (lambda p, a, _: sdf.sphere(p, a[0]), lambda a, _: a[0]),
    "box": (lambda p, a, _: sdf.box(p, a[:3]), lambda a, _: np.linalg.norm(a[:3])),
    "rounded_box": (lambda p, a, _: sdf.rounded_box(p, a[:3], a[3]), lambda a, _: np.linalg.norm(a[:3])),
    "ellipsoid": (lambda p, a, _: sdf.ellipsoid(p, a[:3]), lambda a, _: a[:3].max()),
    "cylinder": (lambda p, a, _: sdf.cylinder(p, a[0], a[1]), lambda a, _: math.hypot(a[0], a[1])),
    "capsule": (lambda p, a, _: sdf.capsule(p, a[0], a[1]), lambda a, _: a[0] + a[1]),
    "torus": (lambda p, a, _: sdf.torus(p, a[0], a[1]), lambda a, _: a[0] + a[1]),
    "cone": (lambda p, a, _: sdf.cone(p, a[0], a[1], a[2]), lambda a, _: math.hypot(max(a[1], a[2]), a[0])),
    "extrusion": (lambda p, a, prof: sdf.extrusion(p, prof, a[0]),
                  lambda a, prof: math.hypot(np.linalg.norm(prof, axis=1).max(), a[0])),
    "lathe": (lambda p, a, prof: sdf.lathe(p, prof), lambda a, prof: np.linalg.norm(prof, axis=1).max()),
}
PRIMITIVE_NAMES = tuple(_PRIMITIVES)


@dataclass(frozen=True)
class Part:
    """One primitive of the CSG program. `params` are the primitive's numbers (see `sdf.py` signatures, in
    order); `profile` is the polygon of `extrusion` or the axis-to-axis chain of `lathe`. The cut surface
    of `subtract` and the intersection surface of `intersect` take this part's material."""
    primitive: str
    params: tuple[float, ...]
    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)   # row-major 3x3, local -> object
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    operation: str = "union"
    blend: float = 0.0
    material: int = 0
    profile: tuple[tuple[float, float], ...] | None = None

    def bounding_radius(self) -> float:
        """Radius around the object origin of a ball that contains this part."""
        prof = None if self.profile is None else np.asarray(self.profile)
        local = _PRIMITIVES[self.primitive][1](np.asarray(self.params, dtype=np.float64), prof)
        return float(self.scale * local + np.linalg.norm(self.translation))


@dataclass(frozen=True)
class ProceduralObject:
    parts: tuple[Part, ...]
    materials: tuple[Material, ...]
    category: str = "custom"
    seed: int = -1
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)    # raw object units
    scale: float = 1.0                                      # raw units -> normalised units

    def normalised(self, center: np.ndarray, scale: float) -> "ProceduralObject":
        return replace(self, center=tuple(float(c) for c in center), scale=float(scale))

    def bounding_radius(self) -> float:
        """Raw-unit radius of a ball around the raw origin containing the object (smooth blends included)."""
        grows = [p.bounding_radius() + p.blend for p in self.parts if p.operation in ("union", "smooth_union")]
        return max(grows)

    def field(self, device: torch.device | str = "cpu") -> "ObjectField":
        return ObjectField(self, torch.device(device))


@dataclass
class _CompiledPart:
    distance: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    params: Tensor
    profile: Tensor | None
    rotation: Tensor
    translation: Tensor
    scale: float
    operation: str
    blend: float
    material: Material


@dataclass
class ObjectField:
    """A `ProceduralObject` compiled to tensors on `device`; all queries take normalised-frame points."""
    obj: ProceduralObject
    device: torch.device
    chunk: int = 1 << 18
    parts: list[_CompiledPart] = field(init=False)

    def __post_init__(self):
        t = lambda x: torch.tensor(x, dtype=torch.float32, device=self.device)
        self.parts = [_CompiledPart(_PRIMITIVES[p.primitive][0], t(p.params),
                                    None if p.profile is None else t(p.profile),
                                    t(p.rotation).reshape(3, 3), t(p.translation), p.scale, p.operation,
                                    p.blend, self.obj.materials[p.material]) for p in self.obj.parts]
        self._center = t(self.obj.center)

    def _to_raw(self, p: Tensor) -> Tensor:
        return p / self.obj.scale + self._center

    def _local(self, part: _CompiledPart, raw: Tensor) -> Tensor:
        """Raw object points in the part's rotated (unscaled) frame; divide by `part.scale` for its SDF."""
        return (raw - part.translation) @ part.rotation

    def _evaluate(self, p: Tensor, with_part: bool) -> tuple[Tensor, Tensor | None]:
        raw = self._to_raw(p)
        d = part_index = None
        for k, part in enumerate(self.parts):
            dk = part.distance(self._local(part, raw) / part.scale, part.params, part.profile) * part.scale
            if d is None:
                d = dk
                part_index = torch.zeros_like(dk, dtype=torch.int64) if with_part else None
                continue
            if part.operation == "union":
                wins, d = dk < d, sdf.union(d, dk)
            elif part.operation == "smooth_union":
                wins, d = dk < d, sdf.smooth_union(d, dk, part.blend)
            elif part.operation == "subtract":
                wins, d = -dk > d, sdf.subtraction(d, dk)
            elif part.operation == "intersect":
                wins, d = dk > d, sdf.intersection(d, dk)
            else:
                raise ValueError(f"unknown operation {part.operation!r}")
            if with_part:
                part_index = torch.where(wins, k, part_index)
        return d * self.obj.scale, part_index

    def sdf(self, p: Tensor) -> Tensor:
        """Signed distance `[P]` at normalised points `p [P,3]`."""
        return torch.cat([self._evaluate(c, False)[0] for c in p.split(self.chunk)]) if len(p) else p[:, 0]

    def sdf_and_part(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """Signed distance `[P]` and the index `[P]` of the part whose surface is closest in the CSG sense."""
        if not len(p):
            return p[:, 0], p[:, 0].long()
        out = [self._evaluate(c, True) for c in p.split(self.chunk)]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def normals(self, p: Tensor, eps: float = 1e-3) -> Tensor:
        """Unit gradient of the field by a tetrahedral finite difference (4 evaluations per point)."""
        k = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=p.dtype, device=p.device)
        d = self.sdf((p[:, None, :] + eps * k).reshape(-1, 3)).reshape(-1, 4)
        return torch.nn.functional.normalize(d @ k, dim=-1)

    def attributes(self, p: Tensor, part_index: Tensor) -> Tensor:
        """PBR attributes `[P,6]` of the given parts' materials at normalised points `p`."""
        raw = self._to_raw(p)
        out = torch.zeros(len(p), ATTRIBUTE_CHANNELS, dtype=p.dtype, device=p.device)
        for k, part in enumerate(self.parts):
            sel = (part_index == k).nonzero().squeeze(1)
            if len(sel):
                out[sel] = evaluate_material(part.material, self._local(part, raw[sel]))
        return out

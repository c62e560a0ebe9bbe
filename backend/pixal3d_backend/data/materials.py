"""Procedural PBR materials: two PBR "inks" mixed by a 3-D pattern field.

A material is evaluated at points in its part's local frame (object units), so patterns stick to the part
under any pose. Attributes follow the official voxel layout (spec §4.4): base_color 0:3 (sRGB, as a texture
stores it), metallic 3:4, roughness 4:5, alpha 5:6, all in [0, 1]. Mixing two full inks lets a pattern vary
any channel (painted stripes on metal, rough/glossy checkers, translucent bands).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor

PATTERNS = ("flat", "stripes", "checker", "noise", "gradient")
ATTRIBUTE_CHANNELS = 6


@dataclass(frozen=True)
class Material:
    ink_a: tuple[float, ...]          # 6 attributes, the value where the pattern is 0
    ink_b: tuple[float, ...]          # 6 attributes, the value where the pattern is 1
    pattern: str = "flat"
    frequency: float = 1.0            # cycles per object unit
    axis: tuple[float, float, float] = (0.0, 1.0, 0.0)
    noise_seed: int = 0


def _hash01(ix: Tensor, iy: Tensor, iz: Tensor, seed: int) -> Tensor:
    """Deterministic per-lattice-point value in [0,1): integer mixing, identical on every device.

    Values are kept below 2**32 before each multiplication so int64 products never overflow.
    """
    mask = 0xFFFFFFFF
    h = (ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791) ^ (seed * 2654435761 & mask)
    h = h & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def value_noise(p: Tensor, seed: int) -> Tensor:
    """Trilinearly interpolated lattice noise with smoothstep weights, in [0,1]."""
    cell = torch.floor(p)
    f = p - cell
    f = f * f * (3.0 - 2.0 * f)
    c = cell.to(torch.int64)
    out = torch.zeros_like(p[:, 0])
    for corner in range(8):
        o = [(corner >> axis) & 1 for axis in range(3)]
        w = torch.ones_like(out)
        for axis in range(3):
            w = w * (f[:, axis] if o[axis] else 1.0 - f[:, axis])
        out = out + w * _hash01(c[:, 0] + o[0], c[:, 1] + o[1], c[:, 2] + o[2], seed)
    return out


def pattern_field(material: Material, p: Tensor) -> Tensor:
    """The mixing weight in [0,1] of `ink_b` at local points `p [P,3]`."""
    axis = torch.tensor(material.axis, dtype=p.dtype, device=p.device)
    s = p @ axis
    f = material.frequency
    if material.pattern == "flat":
        return torch.zeros_like(s)
    if material.pattern == "stripes":
        # A slightly softened square wave, so stripes are crisp but the voxel targets are not aliased noise.
        return torch.sigmoid(8.0 * torch.sin(2.0 * torch.pi * f * s))
    if material.pattern == "checker":
        parity = torch.floor(p * f).to(torch.int64).sum(dim=-1) % 2
        return parity.to(p.dtype)
    if material.pattern == "noise":
        octaves = [value_noise(p * f * 2.0 ** i, material.noise_seed + i) * 0.5 ** i for i in range(3)]
        return (sum(octaves) / 1.75 - 0.5).mul(2.5).add(0.5).clamp(0.0, 1.0)
    if material.pattern == "gradient":
        return (0.5 + 0.25 * f * s).clamp(0.0, 1.0)     # a ramp 4/f long, centred on the part origin
    raise ValueError(f"unknown pattern {material.pattern!r}")


def evaluate_material(material: Material, p: Tensor) -> Tensor:
    """PBR attributes `[P,6]` of `material` at local points `p [P,3]`."""
    a = torch.tensor(material.ink_a, dtype=p.dtype, device=p.device)
    b = torch.tensor(material.ink_b, dtype=p.dtype, device=p.device)
    t = pattern_field(material, p)[:, None]
    return a + (b - a) * t


# --------------------------------------------------------------------------------------------------------
# Random materials
# --------------------------------------------------------------------------------------------------------

def _random_color(rng: np.random.Generator) -> np.ndarray:
    """An sRGB colour from HSV with a bias towards the moderately saturated colours of real objects."""
    h, s, v = rng.random(), rng.beta(1.5, 2.0), 0.15 + 0.85 * rng.beta(2.5, 1.5)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _random_ink(rng: np.random.Generator, translucent: bool) -> np.ndarray:
    metallic = 1.0 if rng.random() < 0.25 else float(rng.uniform(0.0, 0.15))
    roughness = float(rng.uniform(0.1, 0.4) if metallic > 0.5 else rng.uniform(0.25, 0.95))
    alpha = float(rng.uniform(0.3, 0.8)) if translucent else 1.0
    return np.concatenate([_random_color(rng), [metallic, roughness, alpha]])


def random_material(rng: np.random.Generator, translucent_probability: float = 0.08) -> Material:
    """A random material; about `translucent_probability` of them have alpha < 1 (glass, tinted plastic)."""
    translucent = rng.random() < translucent_probability
    pattern = str(rng.choice(PATTERNS, p=[0.4, 0.15, 0.1, 0.2, 0.15]))
    ink_a = _random_ink(rng, translucent)
    if rng.random() < 0.5:                         # a variation of the same ink: tone-on-tone patterns
        ink_b = ink_a.copy()
        ink_b[:3] = np.clip(ink_a[:3] * rng.uniform(0.4, 1.4) + rng.normal(0, 0.05, 3), 0.0, 1.0)
        ink_b[4] = np.clip(ink_a[4] + rng.normal(0, 0.15), 0.05, 1.0)
    else:
        ink_b = _random_ink(rng, translucent)
    axis = rng.normal(size=3)
    if rng.random() < 0.6:                         # most stripes and gradients follow a part axis
        axis = np.eye(3)[rng.integers(3)]
    axis = axis / np.linalg.norm(axis)
    return Material(ink_a=tuple(float(x) for x in ink_a), ink_b=tuple(float(x) for x in ink_b),
                    pattern=pattern, frequency=float(np.exp(rng.uniform(np.log(1.0), np.log(8.0)))),
                    axis=tuple(float(x) for x in axis), noise_seed=int(rng.integers(0, 2 ** 31)))

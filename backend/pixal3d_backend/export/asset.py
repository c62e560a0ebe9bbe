"""The export stage: decoded mesh + voxel PBR attributes -> a UV-mapped, decimated asset with baked maps.

Steps (model frame until the end): small-hole filling (`mesh.fill_small_holes`, the official 3e-2 perimeter);
optional remesh to a closed surface; quadric decimation to the face target;
UV unwrap (axis-projected charts or xatlas, `unwrap.py`); bake base colour + alpha, metallic, roughness from
the voxel field at each texel's point, and optionally a tangent-space normal map from the decoded surface's
normals at the texel's closest point on it; inpainting; uint8.
The result is rotated into the official GLB frame (`camera.R_MODEL_TO_GLB`, spec §7), a proper rotation, so
winding, UVs and tangent-space normals are unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from ..camera import R_MODEL_TO_GLB
from ..mesh import fill_small_holes
from .bake import Reference, bake, vertex_normals
from .closest import ClosestTriangleBand, Grid
from .decimate import decimate
from .remesh import default_remesh_resolution, remesh
from .unwrap import UnwrapMethod, unwrap
from .voxel_field import SparseVoxelField

# Normal-map texels read the decoded surface's normal at their closest point on it when that is within this many
# voxels (further texels keep the low-poly normal).
SNAP_RADIUS_VOXELS = 2.0
# Alpha is "used" when more than this fraction of covered texels is below 250/255.
ALPHA_USED_FRACTION = 1e-3
# Alpha is a cut-out (MASK) rather than blended when at most this fraction of its transparent texels is partial
# (the trilinear field smears a hard edge over ~2 voxels, so an edge band of partial texels is expected).
ALPHA_PARTIAL_FRACTION = 0.5


@dataclass(frozen=True)
class ExportOptions:
    face_target: int = 200_000
    remesh: bool = True
    remesh_resolution: int | None = None        # None: `default_remesh_resolution(...)`, from the face target
    texture_size: int = 2048                    # 512..4096
    normal_map: bool = True
    image_format: Literal["png", "webp"] = "png"
    alpha_mode: Literal["auto", "OPAQUE", "BLEND", "MASK"] = "auto"
    unwrap: UnwrapMethod = "charts"

    def __post_init__(self):
        if not 512 <= self.texture_size <= 4096:
            raise ValueError(f"texture_size must be in 512..4096, got {self.texture_size}")
        if self.face_target < 4:
            raise ValueError(f"face_target must be at least 4, got {self.face_target}")
        if self.image_format not in ("png", "webp"):
            raise ValueError(f"image_format must be 'png' or 'webp', got {self.image_format!r}")
        if self.alpha_mode not in ("auto", "OPAQUE", "BLEND", "MASK"):
            raise ValueError(f"unknown alpha_mode {self.alpha_mode!r}")
        if self.unwrap not in get_args(UnwrapMethod):
            raise ValueError(f"unwrap must be one of {get_args(UnwrapMethod)}, got {self.unwrap!r}")


@dataclass
class ExportedAsset:
    """One textured mesh in the official GLB frame (Y up, the side that faced the camera towards -Z)."""
    positions: np.ndarray               # float32 [V, 3]
    faces: np.ndarray                   # uint32 [F, 3], counter-clockwise = front
    uvs: np.ndarray                     # float32 [V, 2], glTF convention: (0, 0) is the first texel row's left
    normals: np.ndarray                 # float32 [V, 3]
    base_color: np.ndarray              # uint8 [T, T, 4] RGBA (sRGB colour, linear alpha)
    metallic_roughness: np.ndarray      # uint8 [T, T, 3] R = 0, G = roughness, B = metallic
    normal_map: np.ndarray | None       # uint8 [T, T, 3] tangent space, +Y green up
    alpha_mode: Literal["OPAQUE", "BLEND", "MASK"]
    alpha_cutoff: float = 0.5           # used by MASK only
    double_sided: bool = False
    image_format: Literal["png", "webp"] = "png"
    timings: dict[str, float] = field(default_factory=dict)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, T, T] float in [0, 1] -> [T, T, C] uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


def _alpha_mode(alpha: torch.Tensor, coverage: torch.Tensor, requested: str) -> str:
    if requested != "auto":
        return requested
    a = alpha[0][coverage]
    transparent = a < 250 / 255
    if a.numel() == 0 or float(transparent.float().mean()) <= ALPHA_USED_FRACTION:
        return "OPAQUE"
    partial = (a[transparent] > 5 / 255).float().mean()
    return "MASK" if float(partial) <= ALPHA_PARTIAL_FRACTION else "BLEND"


def export_asset(mesh_vertices, mesh_faces, voxel_coords, voxel_attrs, resolution: int,
                 options: ExportOptions = ExportOptions(), device: str | torch.device | None = None) -> ExportedAsset:
    """Builds the asset from a decoded mesh (model frame, vertices in [-0.5, 0.5]^3) and its voxel PBR attributes
    (coords int [N, 3] at `resolution`, attrs [N, 6] = base colour RGB, metallic, roughness, alpha).

    `device`: where the heavy tensor work runs (default: CUDA when available), the chart unwrap's included.
    Decimation, chart packing and xatlas run on the CPU.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str):
        nonlocal clock
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    def on_device(a, dtype=None) -> torch.Tensor:     # arrays or tensors on any device (a GPU pipeline's output)
        return (a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))).to(dev, dtype)

    ref_v = on_device(mesh_vertices, torch.float32)
    ref_f = on_device(mesh_faces, torch.long)
    ref_v, ref_f = fill_small_holes(ref_v, ref_f)
    field_ = SparseVoxelField(on_device(voxel_coords), on_device(voxel_attrs), resolution)
    reference = None
    if options.normal_map:
        h = 1.0 / resolution
        band = ClosestTriangleBand.build(ref_v, ref_f, Grid(origin=-0.5 - 2 * h, spacing=h, dims=resolution + 5),
                                         radius=SNAP_RADIUS_VOXELS * h)
        reference = Reference(ref_v, ref_f, vertex_normals(ref_v, ref_f), band)
        lap("reference_index")

    v, f = ref_v, ref_f
    if options.remesh:
        r = options.remesh_resolution or default_remesh_resolution(resolution, options.face_target, len(ref_f))
        v, f = remesh(v, f, r)
        lap("remesh")
    v_np, f_np = decimate(v.cpu().numpy(), f.cpu().numpy(), options.face_target)
    lap("decimate")
    v = torch.as_tensor(v_np, device=dev)
    n = vertex_normals(v, torch.as_tensor(f_np, device=dev))
    vmap, f_uv, uvs = unwrap(v_np, f_np, n.cpu().numpy(), options.texture_size, options.unwrap, dev)
    lap("unwrap")
    vmap_t = torch.as_tensor(vmap, device=dev)
    v, n = v[vmap_t], n[vmap_t]
    f_t = torch.as_tensor(f_uv, device=dev)
    uvs_t = torch.as_tensor(uvs, device=dev)
    maps = bake(v, n, f_t, uvs_t, field_, options.texture_size, reference)
    lap("bake")

    alpha_mode = _alpha_mode(maps.alpha, maps.coverage, options.alpha_mode)
    alpha = maps.alpha if alpha_mode != "OPAQUE" else torch.ones_like(maps.alpha)
    zeros = torch.zeros_like(maps.metallic)
    rot = torch.as_tensor(R_MODEL_TO_GLB, dtype=torch.float32, device=dev)
    asset = ExportedAsset(
        positions=(v @ rot.T).cpu().numpy().astype(np.float32),
        faces=f_uv.astype(np.uint32),
        uvs=uvs,
        normals=(n @ rot.T).cpu().numpy().astype(np.float32),
        base_color=_to_uint8(torch.cat([maps.base_color, alpha])),
        metallic_roughness=_to_uint8(torch.cat([zeros, maps.roughness, maps.metallic])),
        normal_map=_to_uint8(maps.normal) if maps.normal is not None else None,
        alpha_mode=alpha_mode,
        double_sided=not options.remesh,
        image_format=options.image_format,
        timings=timings,
    )
    lap("encode")
    return asset

"""Pixel back-projection ("ProjGrid", spec §2): every voxel of an R^3 grid takes the image feature found where
the conditioning camera sees it.

Voxel (i, j, k) is represented by the corner-aligned model-frame point `linspace(-1, 1, R)[(i, j, k)] / 2`
(not the voxel centre; training used the same stretch). The point goes to the Blender-style world frame by
`camera.R_MODEL_TO_WORLD` and `/ mesh_scale`, into the camera by the inverse of a Blender camera-to-world
matrix (`camera.front_view_c2w(distance)` for a single view), through a pinhole with a 32 mm sensor, and the
feature map is sampled bilinearly with border padding. Points outside the image are never masked: they take
the border value, as in the official code.

Everything works on an arbitrary set of voxel coordinates, so the pipeline lifts features only for its active
voxels; the dense `ProjGrid` module is the same computation over all R^3 voxels.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from pixal3d_kernels import proj_lift

from pixal3d_backend.camera import R_MODEL_TO_WORLD, front_view_c2w

SENSOR_MM = 32.0   # Blender default sensor width; the official focal length is written in millimetres


def camera_to_world(camera) -> np.ndarray:
    """[4, 4] Blender camera-to-world of a `camera.ViewCamera`-like object."""
    c2w = getattr(camera, "c2w", None)
    if c2w is not None:
        return np.asarray(c2w, dtype=np.float64)
    if camera.distance is None:
        raise ValueError("a camera needs a `distance` (front view) or a `c2w`")
    return front_view_c2w(camera.distance)


class Projection(NamedTuple):
    """Where voxels land in one or more views."""
    uv: torch.Tensor      # [B, N, 2] pixel coordinates (x right, y down), before the half-pixel shift
    depth: torch.Tensor   # [B, N] distance in front of the camera (-z in camera coordinates)
    image_size: int

    @property
    def visible(self) -> torch.Tensor:
        """[B, N] bool: in front of the camera and inside the image (computed, never applied, by the official
        single-view code; used for visibility-weighted multi-view fusion)."""
        return proj_lift.visible(self.uv, self.depth, self.image_size)


class Views(NamedTuple):
    """What the lifting kernel needs of the grid points and of B views (`pixal3d_kernels.proj_lift.lift`)."""
    points: torch.Tensor       # [N, 3] official grid points, before `/ mesh_scale / 2`
    mesh_scale: torch.Tensor   # [B]
    w2c: torch.Tensor          # [B, 4, 4] float32 world-to-camera (Blender camera: looks along -z)
    focal: torch.Tensor        # [B] focal length in pixels of the conditioning image


def dense_grid_coords(grid_resolution: int, device=None) -> torch.Tensor:
    """[R^3, 3] int64 voxel coords (x, y, z) in the official token order `x*R*R + y*R + z`."""
    axis = torch.arange(grid_resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def world_grid_points(coords: torch.Tensor, grid_resolution: int) -> torch.Tensor:
    """[N, 3] float32 grid points of voxels in the world frame, before `/ mesh_scale / 2` (the official
    `ProjGrid.grid_points` rows at these coords)."""
    axis = torch.linspace(-1.0, 1.0, grid_resolution, device=coords.device)
    model = axis[coords.long()]
    rotation = torch.as_tensor(R_MODEL_TO_WORLD, dtype=torch.float32, device=coords.device)
    return model @ rotation.T


def _per_view(value, batch: int, device) -> torch.Tensor:
    """float, sequence or tensor -> float32 [batch]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"expected 1 or {batch} camera values, got {t.numel()}")
    return t.expand(batch)


def _c2w_batch(distance, c2w, batch: int, device) -> torch.Tensor:
    """float32 [batch, 4, 4] Blender camera-to-world matrices."""
    if (distance is None) == (c2w is None):
        raise ValueError("give exactly one of `distance` (front view) or `c2w`")
    if c2w is None:
        c2w = np.stack([front_view_c2w(d) for d in _per_view(distance, batch, "cpu").tolist()])
    c2w = torch.as_tensor(c2w if torch.is_tensor(c2w) else np.asarray(c2w), dtype=torch.float32,
                          device=device).reshape(-1, 4, 4)
    if c2w.shape[0] not in (1, batch):
        raise ValueError(f"expected 1 or {batch} camera matrices, got {c2w.shape[0]}")
    return c2w.expand(batch, 4, 4)


def views_of(coords: torch.Tensor, grid_resolution: int, image_size: int, fov, distance=None, mesh_scale=1.0,
             c2w=None, batch: int = 1) -> Views:
    """Grid points of voxels `coords` [N, 3] of an R^3 grid and `batch` views (camera arguments are scalars or
    per-view sequences/tensors; `c2w` [4,4] or [B,4,4] replaces the front view at `distance`)."""
    device = coords.device
    # The official code inverts the float32 camera-to-world matrix; keep that rounding.
    w2c = torch.linalg.inv(_c2w_batch(distance, c2w, batch, device))
    focal = SENSOR_MM / 2 / torch.tan(_per_view(fov, batch, device) / 2) * image_size / SENSOR_MM
    return Views(world_grid_points(coords, grid_resolution), _per_view(mesh_scale, batch, device), w2c, focal)


def project_voxels(coords: torch.Tensor, grid_resolution: int, image_size: int, fov, distance=None,
                   mesh_scale=1.0, c2w=None, batch: int = 1) -> Projection:
    """Projects voxels `coords` [N, 3] of an R^3 grid into `batch` views (arguments as in `views_of`)."""
    views = views_of(coords, grid_resolution, image_size, fov, distance, mesh_scale, c2w, batch)
    return Projection(*proj_lift.project(*views, image_size), image_size)


def _as_bchw(fmap: torch.Tensor, layout: str) -> torch.Tensor:
    if fmap.dim() != 4:
        raise ValueError(f"feature map must be 4-D ({layout}), got shape {tuple(fmap.shape)}")
    if layout == "BCHW":
        return fmap
    if layout == "BHWC":
        return fmap.permute(0, 3, 1, 2)
    raise ValueError(f"layout must be 'BCHW' or 'BHWC', got {layout!r}")


def lift_features(fmap: torch.Tensor, coords: torch.Tensor, grid_resolution: int, image_size: int, fov,
                  distance=None, mesh_scale=1.0, c2w=None, layout: str = "BCHW") -> torch.Tensor:
    """Image features of voxels `coords` [N, 3] (x, y, z) of an R^3 grid -> [B, N, C], one row block per
    feature map in `fmap` [B, C, H, W] (or [B, H, W, C] with layout "BHWC"), each seen by its own camera.

    `image_size` is the side of the conditioning image the camera refers to (the map may be smaller, e.g. the
    S/16 patch map). Camera arguments are scalars or per-map sequences/tensors; see `project_voxels`.
    """
    fmap = _as_bchw(fmap, layout)
    views = views_of(coords.to(fmap.device), grid_resolution, image_size, fov, distance, mesh_scale, c2w,
                     batch=fmap.shape[0])
    return proj_lift.lift(fmap, *views, image_size, reduce="none")


def lift_features_multiview(fmaps: torch.Tensor, coords: torch.Tensor, grid_resolution: int, image_size: int,
                            fovs, c2ws, mesh_scale=1.0, weighting: str = "mean",
                            layout: str = "BCHW") -> torch.Tensor:
    """Fuses the features of V views (`fmaps` [V, ...], cameras `fovs` [V] and `c2ws` [V, 4, 4] re-based into
    the main view's frame) into one feature per voxel -> [N, C].

    weighting "mean": the plain mean over views, border samples included (official multi-view update, spec
    §3.2). "visible": the mean over the views that see the voxel inside the image; voxels no view sees get 0.
    With one view "mean" is exactly single-view lifting.
    """
    if weighting not in ("mean", "visible"):
        raise ValueError(f"weighting must be 'mean' or 'visible', got {weighting!r}")
    fmaps = _as_bchw(fmaps, layout)
    views = views_of(coords.to(fmaps.device), grid_resolution, image_size, fovs, None, mesh_scale, c2ws,
                     batch=fmaps.shape[0])
    return proj_lift.lift(fmaps, *views, image_size, reduce=weighting)


class ProjGrid(torch.nn.Module):
    """The official dense back-projection over all R^3 voxels (constructor args as in the official class).

    forward(fmap, camera_angle_x, distance, mesh_scale, layout) -> [B, R^3, C], token `x*R*R + y*R + z`.
    The official default layout is the patch-token map [B, H, W, C] ("BHWC").
    """

    def __init__(self, grid_resolution: int, image_resolution: int):
        super().__init__()
        self.grid_resolution = grid_resolution
        self.image_resolution = image_resolution

    def forward(self, fmap: torch.Tensor, camera_angle_x, distance, mesh_scale=1.0,
                layout: str = "BHWC") -> torch.Tensor:
        coords = dense_grid_coords(self.grid_resolution, fmap.device)
        return lift_features(fmap, coords, self.grid_resolution, self.image_resolution, camera_angle_x,
                             distance, mesh_scale, layout=layout)

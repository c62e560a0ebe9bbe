"""The rig check run before a multi-view job: do the cameras see the object, and do they agree on where it is?

Pure NumPy (no bpy), on the renders' alpha masks and the cameras sent to the backend. Posed multi-view only helps
when the poses are right; a camera that looks elsewhere, was moved after the others, or cuts the object off
silently degrades the result, and the backend would spend minutes on it. Each problem becomes one sentence in
plain words; the job still runs (the user may know better).

Agreement is measured on the visual hull: the points whose projection falls inside every camera's mask. For a
rig that is right, the hull seen from each camera fills that camera's silhouette; a camera that disagrees with
the others cuts the hull down, so every silhouette is left partly unexplained (and its own most).
"""
from __future__ import annotations

import numpy as np

from .shared import camera, protocol

CROP_MARGIN = 1.1          # the backend's crop around the object's box (conditioning.preprocess, spec §1.3)
HULL_SAMPLES = 48          # grid points per side of the hull's search box
HULL_BOX = 1.5             # side of the search box in model units (the model cube is 1; depth is the unknown)
SILHOUETTE_CELLS = 24      # cells across the object's box when comparing silhouettes (coarser than the grid)
MIN_AGREEMENT = 0.9        # share of a silhouette the hull must fill (1.0 for exact poses; a camera panned 4 deg: 0.92)


def object_crop(mask: np.ndarray, intrinsics: camera.Intrinsics) -> camera.CropCamera:
    """The crop camera of a mask [H, W] (rows top-down), as the backend crops: the box's centre, 1.1 x its side."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    size = CROP_MARGIN * max(x1 - x0, y1 - y0)
    return camera.CropCamera.from_crop(intrinsics, (x0 + x1) / 2, (y0 + y1) / 2, size)


def project(points: np.ndarray, intrinsics: camera.Intrinsics, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [N, 3] -> (pixels [N, 2] x right / y down, depth [N]) in a camera."""
    local = points @ np.linalg.inv(c2w)[:3, :3].T + np.linalg.inv(c2w)[:3, 3]
    depth = -local[:, 2]
    safe = np.where(depth > 1e-9, depth, 1e-9)
    return np.stack([intrinsics.focal * local[:, 0] / safe + intrinsics.cx,
                     -intrinsics.focal * local[:, 1] / safe + intrinsics.cy], axis=1), depth


def inside_mask(pixels: np.ndarray, depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    col, row = np.floor(pixels[:, 0]).astype(np.int64), np.floor(pixels[:, 1]).astype(np.int64)
    ok = (depth > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = np.zeros(len(pixels), dtype=bool)
    out[ok] = mask[row[ok], col[ok]]
    return out


def hull_points(rig: camera.MultiViewRig) -> np.ndarray:
    """World points of a grid over the search box around the model origin (view 0's crop frame, rig scale)."""
    axis = (np.arange(HULL_SAMPLES) + 0.5) / HULL_SAMPLES * HULL_BOX - HULL_BOX / 2
    model = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    to_world = rig.c2ws[0] @ np.diag([rig.scale] * 3 + [1.0]) @ rig.crops[0].model_to_camera()
    return model @ to_world[:3, :3].T + to_world[:3, 3]


def silhouette_agreement(mask: np.ndarray, pixels: np.ndarray) -> float:
    """Share of the mask's cells (about SILHOUETTE_CELLS across the object) that hull points land in."""
    ys, xs = np.nonzero(mask)
    cell = max(1, int(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1) // SILHOUETTE_CELLS)
    h, w = mask.shape[0] // cell, mask.shape[1] // cell
    silhouette = mask[:h * cell, :w * cell].reshape(h, cell, w, cell).mean(axis=(1, 3)) > 0.5
    hit = np.zeros_like(silhouette)
    col, row = (pixels // cell).astype(np.int64).T
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    hit[row[ok], col[ok]] = True
    return float((hit & silhouette).sum() / max(silhouette.sum(), 1))


def check_rig(names: list[str], masks: list[np.ndarray], intrinsics: list[camera.Intrinsics],
              c2ws: list[np.ndarray]) -> list[str]:
    """Plain-words warnings about a multi-view rig (view 0 first); [] when it looks right."""
    warnings, seen = [], []
    for name, mask, k, c2w in zip(names, masks, intrinsics, c2ws):
        if mask.sum() < protocol.MIN_MASK_PIXELS:
            warnings.append(f"Camera '{name}' does not see the object: its render is empty. Point it at the "
                            "object or leave it out.")
            continue
        if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
            warnings.append(f"Camera '{name}' cuts the object off at the edge of its frame; the model will take "
                            "the edge for the object's outline. Move it back or widen its lens.")
        seen.append((name, mask, k, np.asarray(c2w, dtype=np.float64)))
    if len(seen) < 2:
        return warnings
    try:
        rig = camera.MultiViewRig.from_views([object_crop(m, k) for _, m, k, _ in seen], [c for *_, c in seen])
    except ValueError as error:
        return warnings + [f"The cameras cannot be combined: {error}."]
    points = hull_points(rig)
    projections = [project(points, k, c2w) for _, _, k, c2w in seen]
    in_hull = np.all([inside_mask(p, d, m) for (p, d), (_, m, _, _) in zip(projections, seen)], axis=0)
    if not in_hull.any():
        return warnings + ["The cameras do not agree on where the object is: no point is inside every camera's "
                           "view of it. Check that they all look at the same object and that none has moved."]
    for (name, mask, _, _), (pixels, _) in zip(seen, projections):
        agreement = silhouette_agreement(mask, pixels[in_hull])
        if agreement < MIN_AGREEMENT:
            warnings.append(f"Camera '{name}' disagrees with the other cameras: only {agreement:.0%} of the object "
                            "it sees is where the others see it. Check that it looks at the same object, that "
                            "nothing else is in its view, and that it has not moved.")
    return warnings

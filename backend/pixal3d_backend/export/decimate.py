"""Quadric-error decimation to a face target with `fast_simplification`."""
from __future__ import annotations

import fast_simplification
import numpy as np

TOLERANCE = 0.02


def decimate(vertices: np.ndarray, faces: np.ndarray, face_target: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimate to `face_target` faces (within 2 %); a mesh already at or below the target is returned as is.

    `fast_simplification` stops at or just under the requested count; when the aggressive schedule stops short
    (it skips collapses whose error is too high) the request is lowered by the shortfall and retried once more
    from the input, at a slower, more careful schedule.
    """
    if faces.shape[0] <= face_target:
        return vertices, faces
    request = face_target
    for agg in (7.0, 5.0, 3.0):
        v, f = fast_simplification.simplify(vertices.astype(np.float64), faces.astype(np.int32),
                                            target_count=request, agg=agg)
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
        if abs(f.shape[0] - face_target) <= TOLERANCE * face_target:
            break
        request = max(1, request - (f.shape[0] - face_target)) if f.shape[0] > face_target else face_target
    used = np.unique(f)
    remap = np.full(v.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    return v[used].astype(np.float32), remap[f]

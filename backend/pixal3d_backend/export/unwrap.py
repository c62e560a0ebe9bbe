"""UV unwrap packed for a square texture of a given size: fast axis-projected charts (`charts.py`) or xatlas.

Both return (vmapping [V'] original vertex of each new vertex, faces [F, 3] into the new vertices, uvs [V', 2] in
[0, 1] with v growing down the image rows (the glTF convention)), faces in their input order, charts kept
`padding_texels` apart so that they do not bleed into each other under bilinear filtering.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import xatlas

from .charts import chart_unwrap

UnwrapMethod = Literal["charts", "xatlas"]


def padding_texels(texture_size: int) -> int:
    """Gutter between charts: 2 texels at 512, growing with the size so that the smaller mip levels of a
    4096 map still keep charts apart (4 texels at 2048, 8 at 4096)."""
    return max(2, texture_size // 512)


def _xatlas_unwrap(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, texture_size: int):
    """xatlas charts and packing: `resolution` = the texture size with `bilinear` and a padding of
    `padding_texels`; texels per unit is chosen by xatlas to fill the atlas."""
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32), normals.astype(np.float32))
    chart = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding_texels(texture_size)
    pack.bilinear = True
    pack.blockAlign = True
    pack.rotate_charts = True
    atlas.generate(chart, pack)
    vmapping, indices, uvs = atlas[0]
    return vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float32)


def unwrap(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, texture_size: int,
           method: UnwrapMethod = "charts", device: str | torch.device = "cpu"):
    """Charts and packs the mesh with `method` (see the module doc). "charts" takes well under a second at
    100 k faces and runs its tensor work on `device`; xatlas (CPU, one thread) takes about a minute there."""
    if method == "charts":
        return chart_unwrap(vertices, faces, texture_size, padding_texels(texture_size), device)
    return _xatlas_unwrap(vertices, faces, normals, texture_size)

"""UV unwrap with xatlas, packed for a square texture of a given size."""
from __future__ import annotations

import numpy as np
import xatlas


def padding_texels(texture_size: int) -> int:
    """Gutter between charts: 2 texels at 512, growing with the size so that the smaller mip levels of a
    4096 map still keep charts apart (4 texels at 2048, 8 at 4096)."""
    return max(2, texture_size // 512)


def unwrap(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, texture_size: int):
    """Charts and packs the mesh. Returns (vmapping [V'] original vertex of each new vertex, faces [F, 3] into the
    new vertices, uvs [V', 2] in [0, 1] with v growing down the image rows (the glTF convention)).

    Packing: `resolution` = the texture size with `bilinear` and a padding of `padding_texels` so charts do not
    bleed into each other under bilinear filtering; texels per unit is chosen by xatlas to fill the atlas.
    """
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

"""Sparse voxel attribute field with the trilinear convention of `o_voxel`/`flex_gemm.grid_sample_3d` (spec §6.2).

Voxel `c` (integer coords at resolution `res`, origin -0.5, voxel size 1/res) holds its value at the voxel
centre; a query takes the 8 voxels around it that exist with renormalised trilinear weights, zero where none
exists. The sampling itself (reference and GPU kernel) is `pixal3d_kernels.uv_raster.sample_voxel_field`; this
class keeps the voxels in the sorted-key order it searches.
"""
from __future__ import annotations

import torch
from pixal3d_kernels.uv_raster import sample_voxel_field, voxel_keys


class SparseVoxelField:
    def __init__(self, coords: torch.Tensor, values: torch.Tensor, resolution: int):
        if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] != values.shape[0]:
            raise ValueError("coords must be [N, 3] with one row of values per voxel")
        self.resolution = int(resolution)
        self.keys, order = torch.sort(voxel_keys(coords, self.resolution))
        self.values = values[order].float().contiguous()

    def sample(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trilinear sample at model-frame points [P, 3]. Returns (values [P, C], found [P] bool)."""
        return sample_voxel_field(self.keys, self.values, self.resolution, points)

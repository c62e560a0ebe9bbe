"""Sparse voxel attribute field with the trilinear convention of `o_voxel`/`flex_gemm.grid_sample_3d`.

Voxel `c` (integer coords at resolution `res`, origin -0.5, voxel size 1/res) holds its value at the voxel
centre, i.e. at grid coordinate `c + 0.5` where grid coordinate `u = (p + 0.5) * res`. A query takes the 8
voxels around `u - 0.5`, keeps the ones that exist, renormalises their trilinear weights and returns zero where
none exists (spec §6.2).

Lookup is a sorted-key hash: keys `x * res^2 + y * res + z` are sorted once and queried with
`torch.searchsorted`, which is vectorised on every device and needs no hash-table kernel.
"""
from __future__ import annotations

import torch

_CORNERS = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])


class SparseVoxelField:
    def __init__(self, coords: torch.Tensor, values: torch.Tensor, resolution: int):
        if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] != values.shape[0]:
            raise ValueError("coords must be [N, 3] with one row of values per voxel")
        self.resolution = int(resolution)
        keys = self._keys(coords.long())
        self.keys, order = torch.sort(keys)
        self.values = values[order].float()

    def _keys(self, cells: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        return (cells[..., 0] * r + cells[..., 1]) * r + cells[..., 2]

    def lookup(self, cells: torch.Tensor) -> torch.Tensor:
        """Row of each integer cell [..., 3] in `values`, or -1 where the voxel does not exist."""
        r = self.resolution
        inside = ((cells >= 0) & (cells < r)).all(-1)
        keys = self._keys(cells.clamp(0, r - 1))
        pos = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        found = inside & (self.keys[pos] == keys)
        return torch.where(found, pos, torch.full_like(pos, -1))

    def sample(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trilinear sample at model-frame points [P, 3]. Returns (values [P, C], found [P] bool)."""
        u = (points.float() + 0.5) * self.resolution - 0.5
        base = torch.floor(u)
        frac = u - base
        corners = _CORNERS.to(points.device)
        cells = base.long()[:, None, :] + corners[None]                              # [P, 8, 3]
        w = torch.where(corners[None].bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
        rows = self.lookup(cells)
        w = w * (rows >= 0)
        total = w.sum(-1, keepdim=True)
        found = total[:, 0] > 0
        w = w / total.clamp_min(1e-12)
        vals = self.values[rows.clamp_min(0)]                                        # [P, 8, C]
        return (w[..., None] * vals).sum(1), found

"""The sparse voxel tensor shared by the SLat flows, the sparse VAE decoders and the pipeline.

A `SparseTensor` is a pair (feats [N, C], coords int32 [N, 4] = (batch, x, y, z)) whose rows are
batch-contiguous: all rows of batch item 0, then item 1, ... (the official convention). Operations that
keep the coordinates (`replace(feats)`) share one `cache` dict, so that work that depends only on the
coordinates (the per-sample layout, the 3x3x3 neighbour map of a submanifold convolution) is done once
per coordinate set and reused by every layer at that resolution.
"""
from __future__ import annotations

from typing import Any

import torch


class SparseTensor:
    __slots__ = ("feats", "coords", "cache")

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, cache: dict[str, Any] | None = None):
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        self.feats = feats
        self.coords = coords if coords.dtype == torch.int32 else coords.int()
        self.cache = {} if cache is None else cache

    # -- construction -----------------------------------------------------------------------------------
    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> "SparseTensor":
        """Same coordinates (and cache) with new features, or a new coordinate set with a fresh cache."""
        if coords is None:
            return SparseTensor(feats, self.coords, self.cache)
        return SparseTensor(feats, coords)

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Moves/casts the features; coordinates only follow a device change and stay int32."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return SparseTensor(feats, self.coords, self.cache)
        return SparseTensor(feats, self.coords.to(feats.device))

    # -- properties -------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def batch_size(self) -> int:
        return len(self.layout)

    @property
    def batch_index(self) -> torch.Tensor:
        """Long [N]: the batch item of each row."""
        if "batch_index" not in self.cache:
            self.cache["batch_index"] = self.coords[:, 0].long()
        return self.cache["batch_index"]

    @property
    def layout(self) -> list[slice]:
        """One slice of rows per batch item (rows are batch-contiguous)."""
        if "layout" not in self.cache:
            b = self.coords[:, 0].long()
            n_batch = int(b.max().item()) + 1 if b.numel() else 0
            counts = torch.bincount(b, minlength=n_batch).tolist()
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            self.cache["layout"] = [slice(starts[i], starts[i + 1]) for i in range(n_batch)]
        return self.cache["layout"]

    def per_row(self, per_batch: torch.Tensor) -> torch.Tensor:
        """Broadcasts a per-batch-item tensor [B, ...] to the rows [N, ...]."""
        return per_batch[self.batch_index]

    def __repr__(self) -> str:
        return f"SparseTensor(feats={tuple(self.feats.shape)} {self.feats.dtype}, batch={self.batch_size})"

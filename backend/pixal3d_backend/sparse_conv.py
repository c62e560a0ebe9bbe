"""3x3x3 submanifold sparse convolution with the official (flex_gemm) weight layout.

    out[p] = bias + sum_{kx,ky,kz} weight[:, kx, ky, kz, :] @ in[p + (kx-1, ky-1, kz-1)]

summed over the neighbours that exist in the same batch item; the output has the input's coordinates. This
equals a dense `F.conv3d(grid, weight.permute(0, 4, 1, 2, 3), padding=1)` read back at the active sites.

Two backends compute it from the same `weight` [Co, 3, 3, 3, Ci] and `bias` [Co] parameters:
  * "torch": runs anywhere. `build_neighbor_map` finds the 27 neighbours of every voxel once per coordinate
    set (`CoordinateIndex`: sorted int64 keys + searchsorted, no dense grid); the map is cached in `SparseTensor.cache`, so every
    layer at one resolution reuses it. `submanifold_conv3d` is then a gathered GEMM over row chunks.
  * "spconv": `spconv.pytorch` kernels (the backend the fixtures were produced with). Default on CUDA when
    installed. On CPU spconv is forward-only and races with >1 thread (see shared/docs/gpu_notes.md), so CPU
    defaults to "torch".
`PIXAL3D_SPARSE_CONV=torch|spconv` forces a backend.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .sparse import SparseTensor

# neighbour k = 9*kx + 3*ky + kz sits at offset (kx-1, ky-1, kz-1): the row-major order of weight[:, kx, ky, kz]
KERNEL_OFFSETS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), dim=-1).reshape(27, 3)

# rows per GEMM chunk are chosen so the gathered [rows, 27*Ci] block stays below this many elements
_GATHER_BUDGET = 1 << 26


class CoordinateIndex:
    """Row lookup for a set of unique integer coordinates [N, D] (a sort-based stand-in for a GPU hash map).

    Coordinates are packed into int64 keys (row-major over the bounding box), sorted once, and queries are
    answered with `searchsorted`; a query outside the box or not in the set gets -1.
    """

    def __init__(self, coords: torch.Tensor):
        c = coords.long()
        if c.numel() and int(c.min()) < 0:
            raise ValueError("coordinates must be non-negative")
        self.extent = c.amax(0) + 1 if c.shape[0] else torch.ones(c.shape[1], dtype=torch.long, device=c.device)
        if float(self.extent.double().prod()) >= 2 ** 62:
            raise ValueError(f"coordinate box {self.extent.tolist()} too large to pack into int64 keys")
        self.strides = torch.cat([self.extent.flip(0).cumprod(0).flip(0)[1:], self.extent.new_ones(1)])
        self.sorted_keys, order = (c * self.strides).sum(-1).sort()
        self.order = order.int()

    def find(self, query: torch.Tensor) -> torch.Tensor:
        """int32 [M]: the row of each query coordinate [M, D], or -1."""
        q = query.long()
        if self.sorted_keys.numel() == 0:
            return torch.full(q.shape[:1], -1, dtype=torch.int32, device=q.device)
        inside = ((q >= 0) & (q < self.extent)).all(-1)
        keys = (q * self.strides).sum(-1)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_(max=self.sorted_keys.numel() - 1)
        return torch.where(inside & (self.sorted_keys[pos] == keys), self.order[pos], -1)


def build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    """int32 [N, 27]: row of the voxel at coords + (0, KERNEL_OFFSETS[k]) (same batch item), or -1."""
    index = CoordinateIndex(coords)
    neighbor_map = torch.empty(coords.shape[0], 27, dtype=torch.int32, device=coords.device)
    offsets = KERNEL_OFFSETS.to(coords.device)
    for k in range(27):         # one offset at a time: the [N, 4] query is the only temporary
        query = coords.long()
        query[:, 1:] += offsets[k]
        neighbor_map[:, k] = index.find(query)
    return neighbor_map


def submanifold_conv3d(feats: torch.Tensor, neighbor_map: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Gathered GEMM: for a chunk of rows, stack the 27 neighbour features (zeros where absent) into
    [rows, 27*Ci] and multiply once by weight viewed as [Co, 27*Ci]. One GEMM per chunk keeps the
    accumulation inside the matmul (fp32 accumulate for half inputs on GPU) and is deterministic."""
    n, c_in = feats.shape
    c_out = weight.shape[0]
    w = weight.reshape(c_out, 27 * c_in).t()
    padded = torch.cat([feats, feats.new_zeros(1, c_in)])       # row n is the zero "absent neighbour"
    gather_index = torch.where(neighbor_map < 0, n, neighbor_map).long()
    out = feats.new_empty(n, c_out)
    rows = max(1, _GATHER_BUDGET // (27 * c_in))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        # index_select, not advanced indexing: its backward is a plain index_add (advanced indexing's
        # deterministic backward sorts the indices and made training ~50x slower on the GPU)
        gathered = padded.index_select(0, gather_index[start:stop].reshape(-1)).reshape(stop - start, 27 * c_in)
        out[start:stop] = gathered @ w if bias is None else torch.addmm(bias, gathered, w)
    return out


def _backend(device: torch.device) -> str:
    forced = os.environ.get("PIXAL3D_SPARSE_CONV", "").strip().lower()
    if forced not in ("", "torch", "spconv"):
        raise ValueError(f"PIXAL3D_SPARSE_CONV must be 'torch' or 'spconv', got {forced!r}")
    if forced:
        return forced
    if device.type == "cuda":
        try:
            import spconv.pytorch  # noqa: F401
            return "spconv"
        except ImportError:
            pass
    return "torch"


# (in, out, device type) -> a meta-device spconv module, used only for its algorithm configuration
_SPCONV_CONFIGS: dict = {}


class SubMConv3d(nn.Module):
    """Submanifold 3x3x3 conv; parameters `weight` [Co, 3, 3, 3, Ci] and `bias` [Co] (official key layout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size != 3:
            raise ValueError(f"only 3x3x3 submanifold convolutions are used by Pixal3D, got kernel_size={kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv3d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = 27 * Ci
        bound = 1.0 / (27 * self.in_channels) ** 0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(f"SubMConv3d expects {self.in_channels} channels, got {x.feats.shape[1]}")
        if _backend(x.device) == "spconv":
            return x.replace(self._spconv_forward(x))
        if "neighbor_map" not in x.cache:
            x.cache["neighbor_map"] = build_neighbor_map(x.coords)
        return x.replace(submanifold_conv3d(x.feats, x.cache["neighbor_map"], self.weight, self.bias))

    def _spconv_forward(self, x: SparseTensor) -> torch.Tensor:
        import spconv.pytorch as spconv

        # spconv's module only supplies the algorithm configuration; the computation uses our own `weight`
        # (spconv's KRSC layout is ours) and the bias is added here because spconv's CPU kernels cannot fuse it.
        key = (self.in_channels, self.out_channels, x.device.type)
        if key not in _SPCONV_CONFIGS:
            with torch.device("meta"):      # no weight allocation: the module is never called itself
                _SPCONV_CONFIGS[key] = spconv.SubMConv3d(self.in_channels, self.out_channels, 3, bias=False,
                                                         indice_key="subm3")
        config = _SPCONV_CONFIGS[key]
        if "spconv_indices" not in x.cache:
            spatial = (x.coords[:, 1:].max(0).values + 1).tolist() if x.coords.shape[0] else [1, 1, 1]
            x.cache["spconv_indices"] = {}
            x.cache["spconv_shape"] = (spatial, x.batch_size)
        spatial, batch_size = x.cache["spconv_shape"]
        # spconv silently misreads non-contiguous indices (e.g. the column-major result of torch.argwhere)
        sp_in = spconv.SparseConvTensor(x.feats.contiguous(), x.coords.contiguous(), spatial, batch_size,
                                        indice_dict=x.cache["spconv_indices"])
        if x.device.type == "cpu":      # spconv's multi-threaded CPU kernel returns wrong rows at random
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                sp_out = config._conv_forward(False, sp_in, self.weight, None)
            finally:
                torch.set_num_threads(threads)
        else:
            sp_out = config._conv_forward(False, sp_in, self.weight, None)
        x.cache["spconv_indices"].update(sp_out.indice_dict)     # the subm pairs, reused by later layers
        out = sp_out.features
        return out if self.bias is None else out + self.bias

"""3x3x3 submanifold sparse convolution with the official (flex_gemm) weight layout, and its neighbour map.

    out[p] = bias + sum_{kx,ky,kz} weight[:, kx, ky, kz, :] @ in[p + (kx-1, ky-1, kz-1)]

summed over the neighbours that exist in the same batch item; the output has the input's coordinates. This
equals a dense `F.conv3d(grid, weight.permute(0, 4, 1, 2, 3), padding=1)` read back at the active sites.
Coordinates are int [N, 4] = (batch, x, y, z), unique and non-negative.

Two computations, each as a plain-PyTorch reference and a Triton kernel (`sparse_conv_triton`):
  * `build_neighbor_map(coords)` -> int32 [N, 27]: the row of the voxel at coords + (0, KERNEL_OFFSETS[k]), or -1.
    Reference: `CoordinateIndex` (a dense table of rows, or sorted int64 keys + searchsorted). Kernel: an
    open-addressing GPU hash table. Both give the identical map.
  * `submanifold_conv3d(feats, neighbor_map, weight, bias)`. Reference: a gathered GEMM over row chunks (keeps
    autograd). Kernel: an implicit GEMM that gathers the neighbour rows tile by tile and skips the offsets no row
    of a tile has (inference only: it has no backward, so anything that needs a gradient runs the reference).
The public functions dispatch with `pixal3d_kernels.use_triton`.
"""
from __future__ import annotations

import torch

from . import use_triton

# neighbour k = 9*kx + 3*ky + kz sits at offset (kx-1, ky-1, kz-1): the row-major order of weight[:, kx, ky, kz]
KERNEL_OFFSETS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), dim=-1).reshape(27, 3)

# rows per GEMM chunk of the reference are chosen so the gathered [rows, 27*Ci] block stays below this many elements:
# large on a GPU (few launches), cache-sized on a CPU (a 226 k-voxel shell, 16-64 channels, 2-core development
# machine: 1.5-7x faster at 2^20 than at 2^26)
_GATHER_BUDGET = {"cpu": 1 << 20}
_GATHER_BUDGET_DEFAULT = 1 << 26


# ---------------------------------------------------------------------------------------------------------
# neighbour map
# ---------------------------------------------------------------------------------------------------------

class CoordinateIndex:
    """Row lookup for a set of unique integer coordinates [N, D] (a stand-in for a GPU hash map).

    Coordinates (shifted by `margin` per dimension) are packed into int64 keys, row-major over their bounding box
    grown by `margin` on both sides. A box of at most `DENSE_LIMIT` cells gets a dense int32 table of rows, so a
    lookup is one gather (and `find_shifted` of an offset within the margin needs no bounds test at all: on a CPU
    the neighbour map of a decoded object's level is ~4x faster than by binary search); a larger box keeps the keys
    sorted and answers with `searchsorted`. Either way a query outside the box or not in the set gets -1.
    """
    DENSE_LIMIT = 1 << 25       # cells: a 128 MiB table at most

    def __init__(self, coords: torch.Tensor, margin: list[int] | None = None):
        c = coords.long()
        if c.numel() and int(c.min()) < 0:
            raise ValueError("coordinates must be non-negative")
        self.coords = c
        self.margin = torch.tensor(margin or [0] * c.shape[1], dtype=torch.long, device=c.device)
        box = c.amax(0) + 1 if c.shape[0] else torch.ones(c.shape[1], dtype=torch.long, device=c.device)
        self.extent = box + 2 * self.margin
        cells = float(self.extent.double().prod())
        if cells >= 2 ** 62:
            raise ValueError(f"coordinate box {self.extent.tolist()} too large to pack into int64 keys")
        self.strides = torch.cat([self.extent.flip(0).cumprod(0).flip(0)[1:], self.extent.new_ones(1)])
        self.keys = ((c + self.margin) * self.strides).sum(-1)
        self.table = self.sorted_keys = None
        if cells <= self.DENSE_LIMIT:
            self.table = torch.full((int(cells),), -1, dtype=torch.int32, device=c.device)
            self.table[self.keys] = torch.arange(c.shape[0], dtype=torch.int32, device=c.device)
        else:
            self.sorted_keys, order = self.keys.sort()
            self.order = order.int()

    def find(self, query: torch.Tensor) -> torch.Tensor:
        """int32 [M]: the row of each query coordinate [M, D], or -1."""
        q = query.long() + self.margin
        inside = ((q >= 0) & (q < self.extent)).all(-1)
        keys = (q * self.strides).sum(-1)
        if self.table is not None:
            return torch.where(inside, self.table[torch.where(inside, keys, 0)], -1)
        if self.sorted_keys.numel() == 0:
            return torch.full(q.shape[:1], -1, dtype=torch.int32, device=q.device)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_(max=self.sorted_keys.numel() - 1)
        return torch.where(inside & (self.sorted_keys[pos] == keys), self.order[pos], -1)

    def find_shifted(self, offset: torch.Tensor) -> torch.Tensor:
        """int32 [N]: the row of each indexed coordinate + `offset` [D], or -1."""
        offset = offset.to(self.coords.device)
        if self.table is not None and bool((offset.abs() <= self.margin).all()):
            return self.table[self.keys + (offset * self.strides).sum()]
        return self.find(self.coords + offset)


def build_neighbor_map_reference(coords: torch.Tensor) -> torch.Tensor:
    """int32 [N, 27]: row of the voxel at coords + (0, KERNEL_OFFSETS[k]) (same batch item), or -1."""
    index = CoordinateIndex(coords, margin=[0, 1, 1, 1])
    neighbor_map = torch.empty(coords.shape[0], 27, dtype=torch.int32, device=coords.device)
    offsets = torch.cat([torch.zeros(27, 1, dtype=torch.long), KERNEL_OFFSETS], 1)
    for k in range(27):         # one offset at a time: an [N] gather is the only temporary
        neighbor_map[:, k] = index.find_shifted(offsets[k])
    return neighbor_map


def build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    """int32 [N, 27] neighbour map (see the module docstring); the Triton hash table where `use_triton`, when the
    coordinates fit its 16-bit key fields (batch < 2^15, x, y, z < 2^16), else the reference."""
    if coords.shape[0] and use_triton(coords):
        from . import sparse_conv_triton

        low, high = coords.aminmax()
        if int(low) < 0:
            raise ValueError("coordinates must be non-negative")
        if sparse_conv_triton.fits_hash_keys(int(high)):
            return sparse_conv_triton.build_neighbor_map(coords)
    return build_neighbor_map_reference(coords)


# ---------------------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------------------

def submanifold_conv3d_reference(feats: torch.Tensor, neighbor_map: torch.Tensor, weight: torch.Tensor,
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
    rows = max(1, _GATHER_BUDGET.get(feats.device.type, _GATHER_BUDGET_DEFAULT) // (27 * c_in))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        # index_select, not advanced indexing: its backward is a plain index_add (advanced indexing's
        # deterministic backward sorts the indices and made training ~50x slower on the GPU)
        gathered = padded.index_select(0, gather_index[start:stop].reshape(-1)).reshape(stop - start, 27 * c_in)
        out[start:stop] = gathered @ w if bias is None else torch.addmm(bias, gathered, w)
    return out


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def submanifold_conv3d(feats: torch.Tensor, neighbor_map: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
    """feats [N, Ci], neighbor_map int32 [N, 27], weight [Co, 3, 3, 3, Ci], bias [Co] or None -> [N, Co].

    The Triton kernel where `use_triton` and no gradient is needed, else the reference. `cache` is a dict kept
    per coordinate set (`SparseTensor.cache`): the kernel keeps its tiling plan of the neighbour map there, so
    every layer on the same coordinates reuses it.
    """
    if use_triton(feats) and not _needs_grad(feats, weight, bias):
        from . import sparse_conv_triton

        plan = cache.get("submanifold_conv3d_plan") if cache is not None else None
        if plan is None:
            plan = sparse_conv_triton.ConvPlan.build(neighbor_map)
            if cache is not None:
                cache["submanifold_conv3d_plan"] = plan
        return sparse_conv_triton.submanifold_conv3d(feats, plan, weight, bias)
    return submanifold_conv3d_reference(feats, neighbor_map, weight, bias)

"""Triton kernels of `sparse_conv`: the neighbour map through a GPU hash table, and the submanifold convolution
as an implicit GEMM. Imported only when `use_triton` says so (Triton reads TRITON_INTERPRET at import).

Neighbour map. Every voxel's (batch, x, y, z) is packed into one int64 key (16 bits a field) and inserted into an
open-addressing table with linear probing (`atomic_cas` claims a slot, so concurrent inserts never collide); then
each (voxel, offset) pair probes the table for its neighbour's key. The table has a power of two >= 2N slots, so
probe chains stay short. The result is exactly the reference's map (lookups are exact).

Convolution. out[N, Co] = sum over the 27 offsets of gather(feats, neighbor_map[:, k]) @ W_k^T: one program
computes a [BLOCK_M rows, BLOCK_N output channels] tile in fp32, stepping through (offset, input-channel block)
pairs and gathering the neighbour rows of its tile straight from `feats` (absent neighbours load zeros). A
`ConvPlan` (built once per neighbour map) reorders rows so that rows with the same set of present neighbours
share tiles (a stable sort by that 27-bit mask: on voxel surfaces most tiles then lack several offsets) and
lists, per tile, the offsets at least one of its rows has: the kernel loops over those only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_precision import dot_input_precision

# largest coordinate (batch or spatial) the 16-bit key fields take; neighbours at +1 still fit a field
KEY_LIMIT = 1 << 15
EMPTY_KEY = tl.constexpr(-1)   # an unclaimed slot (keys are >= 0)
NEVER_KEY = tl.constexpr(-2)   # compared against by lanes that are done, so their compare-and-swap never writes


def fits_hash_keys(largest: int) -> bool:
    """Whether coordinates whose largest entry (batch or spatial) is `largest` pack into the table's keys."""
    return largest < KEY_LIMIT


# ---------------------------------------------------------------------------------------------------------
# neighbour map
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _pack_key(b, x, y, z):
    return (((b.to(tl.int64) << 16 | x.to(tl.int64)) << 16) | y.to(tl.int64)) << 16 | z.to(tl.int64)


@triton.jit
def _home_slot(key, LOG2_SLOTS: tl.constexpr):
    # Fibonacci hashing: the top bits of key * 2^64/phi spread neighbouring keys over the whole table
    return ((key.to(tl.uint64) * 0x9E3779B97F4A7C15) >> (64 - LOG2_SLOTS)).to(tl.int64)


@triton.jit
def _insert_kernel(coords_ptr, n, table_keys_ptr, table_rows_ptr, LOG2_SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    c = coords_ptr + rows.to(tl.int64) * 4
    key = _pack_key(tl.load(c, mask=valid, other=0), tl.load(c + 1, mask=valid, other=0),
                    tl.load(c + 2, mask=valid, other=0), tl.load(c + 3, mask=valid, other=0))
    slot = _home_slot(key, LOG2_SLOTS)
    pending = valid
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        expected = tl.where(pending, EMPTY_KEY, NEVER_KEY).to(tl.int64)
        seen = tl.atomic_cas(table_keys_ptr + slot, expected, key)
        claimed = pending & (seen == EMPTY_KEY)
        tl.store(table_rows_ptr + slot, rows, mask=claimed)
        pending = pending & (seen != EMPTY_KEY) & (seen != key)      # seen == key: a duplicate, the first stays
        slot = tl.where(pending, (slot + 1) & ((1 << LOG2_SLOTS) - 1), slot)


@triton.jit
def _lookup_kernel(coords_ptr, n, table_keys_ptr, table_rows_ptr, out_ptr, LOG2_SLOTS: tl.constexpr,
                   BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = tl.arange(0, 32)                              # offsets 0..26; the 5 spare columns stay masked
    valid = (rows < n)[:, None] & (k < 27)[None, :]
    c = coords_ptr + rows.to(tl.int64) * 4
    b = tl.load(c, mask=rows < n, other=0)[:, None]
    x = tl.load(c + 1, mask=rows < n, other=0)[:, None] + (k // 9 - 1)[None, :]
    y = tl.load(c + 2, mask=rows < n, other=0)[:, None] + ((k // 3) % 3 - 1)[None, :]
    z = tl.load(c + 3, mask=rows < n, other=0)[:, None] + (k % 3 - 1)[None, :]
    key = _pack_key(b, x, y, z)
    slot = _home_slot(key, LOG2_SLOTS)
    found = tl.full((BLOCK, 32), -1, tl.int32)
    pending = valid & (x >= 0) & (y >= 0) & (z >= 0)      # -1 would borrow from the next field
    while tl.max(pending.to(tl.int32)) > 0:
        seen = tl.load(table_keys_ptr + slot, mask=pending, other=EMPTY_KEY)
        hit = pending & (seen == key)
        found = tl.where(hit, tl.load(table_rows_ptr + slot, mask=hit, other=-1), found)
        pending = pending & (seen != key) & (seen != EMPTY_KEY)
        slot = tl.where(pending, (slot + 1) & ((1 << LOG2_SLOTS) - 1), slot)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * 27 + k[None, :], found, mask=valid)


def build_neighbor_map(coords: torch.Tensor) -> torch.Tensor:
    """int32 [N, 27] neighbour map of unique coords [N, 4] with entries < KEY_LIMIT (the caller checks)."""
    coords = coords.to(torch.int32).contiguous()
    n = coords.shape[0]
    log2_slots = max(4, (2 * n - 1).bit_length())
    table_keys = torch.full((1 << log2_slots,), EMPTY_KEY.value, dtype=torch.int64, device=coords.device)
    table_rows = torch.empty(1 << log2_slots, dtype=torch.int32, device=coords.device)
    out = torch.empty(n, 27, dtype=torch.int32, device=coords.device)
    _insert_kernel[(triton.cdiv(n, 256),)](coords, n, table_keys, table_rows, LOG2_SLOTS=log2_slots, BLOCK=256)
    _lookup_kernel[(triton.cdiv(n, 32),)](coords, n, table_keys, table_rows, out, LOG2_SLOTS=log2_slots, BLOCK=32)
    return out


# ---------------------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------------------

# rows per tile: the plan's unit (its per-tile offset lists) and the kernel's BLOCK_M
TILE_ROWS = 128


@dataclass
class ConvPlan:
    """The neighbour map arranged for the kernel: output row of each tile position (`rows` int32 [N]), the map in
    that order and transposed (`neighbors` int32 [27, N], coalesced per offset), and per tile of TILE_ROWS
    positions the offsets any of its rows has (`tile_offsets` int32 [tiles, 27], those first, ascending) and how
    many (`tile_offset_counts` int32 [tiles])."""
    rows: torch.Tensor
    neighbors: torch.Tensor
    tile_offsets: torch.Tensor
    tile_offset_counts: torch.Tensor

    @staticmethod
    def build(neighbor_map: torch.Tensor, sort_rows: bool = True) -> "ConvPlan":
        """`sort_rows=False` keeps the input order (for benchmarks: the sort's gain against its lost locality)."""
        n, device = neighbor_map.shape[0], neighbor_map.device
        present = neighbor_map >= 0
        if sort_rows:
            mask = (present.int() << torch.arange(27, device=device, dtype=torch.int32)).sum(1)
            rows = mask.argsort(stable=True).int()
            present = present[rows]
            neighbors = neighbor_map[rows].t().contiguous()
        else:
            rows = torch.arange(n, device=device, dtype=torch.int32)
            neighbors = neighbor_map.t().contiguous()
        tiles = triton.cdiv(n, TILE_ROWS)
        padded = torch.zeros(tiles * TILE_ROWS, 27, dtype=torch.bool, device=device)
        padded[:n] = present
        active = padded.view(tiles, TILE_ROWS, 27).any(1)
        k = torch.arange(27, device=device, dtype=torch.int32)
        tile_offsets = (torch.where(active, k, k + 32).sort(1).values % 32).int().contiguous()
        return ConvPlan(rows, neighbors, tile_offsets, active.sum(1).int())


@triton.jit
def _submanifold_conv_kernel(feats_ptr, neighbors_ptr, rows_ptr, tile_offsets_ptr, tile_offset_counts_ptr,
                             weight_ptr, bias_ptr, out_ptr, n, c_in, c_out, n_col_blocks,
                             HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one axis (row tiles can outnumber the 65535 allowed on the others); the column blocks of a row tile are
    # consecutive programs, so its gathered rows are still in L2 when the next column block reads them
    tile = tl.program_id(0) // n_col_blocks
    cols = (tl.program_id(0) % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_ok = pos < n
    col_ok = cols < c_out
    k_blocks = tl.cdiv(c_in, BLOCK_K)
    steps = tl.load(tile_offset_counts_ptr + tile) * k_blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(steps):
        offset = tl.load(tile_offsets_ptr + tile * 27 + step // k_blocks)
        ch = (step % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        ch_ok = ch < c_in
        neighbor = tl.load(neighbors_ptr + offset.to(tl.int64) * n + pos, mask=pos_ok, other=-1)
        a = tl.load(feats_ptr + neighbor.to(tl.int64)[:, None] * c_in + ch[None, :],
                    mask=(neighbor >= 0)[:, None] & ch_ok[None, :], other=0.0)
        # weight [Co, 27, Ci] read as the [BLOCK_K, BLOCK_N] slice W[cols, offset, ch]^T
        w = tl.load(weight_ptr + cols.to(tl.int64)[None, :] * (27 * c_in) + offset * c_in + ch[:, None],
                    mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = tl.load(rows_ptr + pos, mask=pos_ok, other=0)
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * c_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=pos_ok[:, None] & col_ok[None, :])


def _pow2_between(x: int, low: int, high: int) -> int:
    return min(high, max(low, triton.next_power_of_2(x)))


def tile_config(c_in: int, c_out: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for a layer (tl.dot needs every block dim >= 16)."""
    wide = dtype != torch.float32
    block_n = _pow2_between(c_out, 16, 128)
    block_k = _pow2_between(c_in, 16, 64 if wide else 32)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_n >= 128 else 4, num_stages=3)


def submanifold_conv3d(feats: torch.Tensor, plan: ConvPlan, weight: torch.Tensor, bias: torch.Tensor | None,
                       config: dict | None = None) -> torch.Tensor:
    """feats [N, Ci] -> [N, Co] with weight [Co, 3, 3, 3, Ci] and bias [Co] (same dtype as feats); `config`
    overrides `tile_config` (benchmark sweeps)."""
    n, c_in = feats.shape
    c_out = weight.shape[0]
    if weight.shape != (c_out, 3, 3, 3, c_in):
        raise ValueError(f"weight must be [Co, 3, 3, 3, {c_in}], got {tuple(weight.shape)}")
    if weight.dtype != feats.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from feats dtype {feats.dtype}")
    out = feats.new_empty(n, c_out)
    if n == 0:
        return out
    config = config or tile_config(c_in, c_out, feats.dtype)
    n_col_blocks = triton.cdiv(c_out, config["BLOCK_N"])
    grid = (triton.cdiv(n, TILE_ROWS) * n_col_blocks,)
    _submanifold_conv_kernel[grid](
        feats.contiguous(), plan.neighbors, plan.rows, plan.tile_offsets, plan.tile_offset_counts,
        weight.contiguous(), bias if bias is not None else weight, out, n, c_in, c_out, n_col_blocks,
        HAS_BIAS=bias is not None, INPUT_PRECISION=dot_input_precision(feats.dtype), BLOCK_M=TILE_ROWS, **config)
    return out

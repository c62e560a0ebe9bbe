"""Voxel-set bookkeeping shared by the encoders, the batches and the losses.

Sets of sparse coords (b, x, y, z) are compared through packed int64 keys `((b * R + x) * R + y) * R + z`,
whose order is the row-major order of `torch.unique(coords, dim=0)`.

The decoders split voxels into children with `models.sparse_vae.channel_to_space` (parent-major, child k =
ox + 2 oy + 4 oz ascending); `subdivision_guides` replays that on the true voxel set so a decoder can be run
teacher-forced (its voxels at every level are exactly the target's, in the decoder's own row order).
"""
from __future__ import annotations

import torch

from ..models.sparse_vae import CHILD_OFFSETS, channel_to_space
from ..sparse import SparseTensor


def pack(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """int64 keys [N] of coords [N, 4] = (b, x, y, z) with x, y, z in [0, resolution)."""
    c = coords.long()
    return ((c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]) * resolution + c[:, 3]


def lookup(query: torch.Tensor, table: torch.Tensor, resolution: int) -> torch.Tensor:
    """Row of `table` holding each coord of `query` (both [., 4]), or -1 where it is absent."""
    keys = pack(table, resolution)
    sorted_keys, order = keys.sort()
    q = pack(query, resolution)
    pos = torch.searchsorted(sorted_keys, q).clamp_(max=max(len(keys) - 1, 0))
    found = sorted_keys[pos] == q if len(keys) else torch.zeros_like(q, dtype=torch.bool)
    return torch.where(found, order[pos], -1)


def coarsen(coords: torch.Tensor, factor: int) -> torch.Tensor:
    """The distinct cells, at 1/factor of the resolution, that contain the voxels `coords` [N, 4] (sorted)."""
    parents = coords.clone()
    parents[:, 1:] = torch.div(coords[:, 1:], factor, rounding_mode="floor")
    return torch.unique(parents, dim=0)


def subdivision_guides(latent_coords: torch.Tensor, voxels: torch.Tensor, levels: int, resolution: int
                       ) -> tuple[list[SparseTensor], torch.Tensor]:
    """True child occupancy for a decoder with `levels` C2S blocks on `latent_coords` [M, 4] whose output
    voxels should be `voxels` [N, 4] at `resolution`. Returns (per level, the subdivision logits [M_s, 8]
    (+1 keep, -1 drop) on the rows the decoder has at that level, the `guide_subs` format; and the decoded
    coords [N, 4] in the decoder's output order)."""
    guides, coords = [], latent_coords.int()
    offsets = CHILD_OFFSETS.to(voxels.device)
    for s in range(levels):
        child_res = resolution >> (levels - s - 1)
        occupied = coarsen(voxels, 1 << (levels - s - 1))
        children = coords[:, None, :].repeat(1, 8, 1)
        children[..., 1:] = children[..., 1:] * 2 + offsets
        keep = lookup(children.reshape(-1, 4), occupied, child_res).reshape(-1, 8) >= 0
        guides.append(SparseTensor(keep.float() * 2 - 1, coords))
        coords = channel_to_space(guides[-1], keep)[2]
    return guides, coords


def space_to_channel(x: SparseTensor) -> SparseTensor:
    """Inverse of the decoders' channel-to-space: each 2x2x2 block of voxels becomes one voxel at half the
    resolution whose channel block k holds child k's features (zeros for absent children). The parents'
    coords are sorted; the result shares a cache with every tensor on the same children (see `_parents`)."""
    parent_coords, inverse, child, cache = _parents(x)
    c = x.feats.shape[1]
    feats = x.feats.new_zeros(parent_coords.shape[0], 8, c)
    feats[inverse, child] = x.feats
    return SparseTensor(feats.reshape(-1, 8 * c), parent_coords, cache)


def _parents(x: SparseTensor):
    """(parent coords, parent row of each child, child index k, the parents' shared cache), cached per coords."""
    if "space_to_channel" not in x.cache:
        half = torch.div(x.coords[:, 1:], 2, rounding_mode="floor")
        parent_coords, inverse = torch.unique(torch.cat([x.coords[:, :1], half], 1), dim=0, return_inverse=True)
        o = (x.coords[:, 1:] - 2 * half).long()
        child = o[:, 0] + 2 * o[:, 1] + 4 * o[:, 2]
        x.cache["space_to_channel"] = (parent_coords.int(), inverse, child, {})
    return x.cache["space_to_channel"]

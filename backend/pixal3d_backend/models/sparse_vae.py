"""TRELLIS.2 sparse VAE decoders: structured latent (32 ch on a G/16 grid) -> per-voxel outputs at 16x.

    from_latent -> stage s = 0..4: num_blocks[s] x ConvNeXt(C_s), then (s < 4) a C2S block C_s -> C_{s+1}
    that splits every voxel into its kept children -> LayerNorm (no affine) -> output_layer

`SparseUnetVaeDecoder` outputs raw per-voxel features (texture: 6 PBR channels, `*0.5+0.5` by the caller).
`FlexiDualGridVaeDecoder` is the same network with 7 outputs turned into a mesh per batch item. The shape
decoder predicts which children to keep (`to_subdiv` logits, returned as `subs`); the texture decoder is given
those (`guide_subs`) so both decoders produce the same voxels in the same order.

With `use_fp16` the Linear/conv weights inside `blocks` are fp16 and the blocks run in fp16; norms compute in
fp32; `from_latent`, the final norm and `output_layer` run in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..mesh import VoxelMesh, flexible_dual_grid_to_mesh
from ..sparse import SparseTensor
from ..sparse_conv import SubMConv3d
from .norms import LayerNorm32

# child k of a voxel sits at 2 * parent + CHILD_OFFSETS[k], k = ox + 2*oy + 4*oz
CHILD_OFFSETS = torch.tensor([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=torch.int32)


def channel_to_space(x: SparseTensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The children of each voxel of `x` that `keep` [N, 8] (bool; None = all) selects, parent-major and k
    ascending: (parent row [M], child k [M], child coords int32 [M, 4]). Child k takes channel block k."""
    if keep is None:
        keep = torch.ones(x.coords.shape[0], 8, dtype=torch.bool, device=x.device)
    parent, child = keep.nonzero(as_tuple=True)
    coords = x.coords[parent]
    coords[:, 1:] = coords[:, 1:] * 2 + CHILD_OFFSETS.to(x.device)[child]
    return parent, child, coords


def _child_feats(feats: torch.Tensor, parent: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
    return feats.reshape(feats.shape[0], 8, -1)[parent, child]


class SparseConvNeXtBlock3d(nn.Module):
    """x + MLP(LayerNorm(conv3x3x3(x)))."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = LayerNorm32(channels, eps=1e-6)
        self.conv = SubMConv3d(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, int(channels * mlp_ratio)), nn.SiLU(),
                                 nn.Linear(int(channels * mlp_ratio), channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv(x).feats
        return x.replace(x.feats + self.mlp(self.norm(h)))


class SparseResBlockC2S3d(nn.Module):
    """Residual block that doubles the resolution: conv to 8*Co channels at the parent voxels, distribute the
    channel blocks to the kept children (channel-to-space), conv at the children, plus the channel-to-space of
    the input repeated to Co channels as the skip."""

    def __init__(self, channels: int, out_channels: int, pred_subdiv: bool = True):
        super().__init__()
        if channels % 8 or out_channels % (channels // 8):
            raise ValueError(f"C2S block needs channels % 8 == 0 and out % (in / 8) == 0, got {channels}->{out_channels}")
        self.channels, self.out_channels, self.pred_subdiv = channels, out_channels, pred_subdiv
        self.norm1 = LayerNorm32(channels, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SubMConv3d(channels, out_channels * 8)
        self.conv2 = SubMConv3d(out_channels, out_channels)
        if pred_subdiv:
            self.to_subdiv = nn.Linear(channels, 8)

    def subdivision(self, x: SparseTensor, guide: SparseTensor | None) -> SparseTensor | None:
        """The subdivision logits [N, 8] (child kept iff > 0): the guide's when given (the texture decoder follows
        the shape decoder; benchmarks force an object's own hierarchy), else predicted, else None (keep all)."""
        if guide is not None:
            return guide
        return x.replace(self.to_subdiv(x.feats)) if self.pred_subdiv else None

    def forward(self, x: SparseTensor, subdiv: SparseTensor | None) -> SparseTensor:
        keep = None if subdiv is None else subdiv.feats > 0
        parent, child, coords = channel_to_space(x, keep)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats)))).feats
        h = SparseTensor(_child_feats(h, parent, child), coords)
        skip = _child_feats(x.feats, parent, child).repeat_interleave(self.out_channels // (self.channels // 8), dim=1)
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        return h.replace(h.feats + skip)


_BLOCKS = {"SparseConvNeXtBlock3d": SparseConvNeXtBlock3d}
_UP_BLOCKS = {"SparseResBlockC2S3d": SparseResBlockC2S3d}


class SparseUnetVaeDecoder(nn.Module):
    def __init__(self, out_channels: int, model_channels: list[int], latent_channels: int, num_blocks: list[int],
                 block_type: list[str], up_block_type: list[str], block_args: list[dict] | None = None,
                 use_fp16: bool = False, pred_subdiv: bool = True):
        super().__init__()
        # block_args only carries `use_checkpoint` (gradient checkpointing during training): nothing at inference
        for name in block_type:
            if name not in _BLOCKS:
                raise ValueError(f"unsupported block_type {name!r}; supported: {sorted(_BLOCKS)}")
        for name in up_block_type:
            if name not in _UP_BLOCKS:
                raise ValueError(f"unsupported up_block_type {name!r}; supported: {sorted(_UP_BLOCKS)}")
        self.pred_subdiv = pred_subdiv
        self.from_latent = nn.Linear(latent_channels, model_channels[0])
        self.blocks = nn.ModuleList()
        for s, channels in enumerate(model_channels):
            stage = nn.ModuleList(_BLOCKS[block_type[s]](channels) for _ in range(num_blocks[s]))
            if s < len(model_channels) - 1:
                stage.append(_UP_BLOCKS[up_block_type[s]](channels, model_channels[s + 1], pred_subdiv=pred_subdiv))
            self.blocks.append(stage)
        self.output_layer = nn.Linear(model_channels[-1], out_channels)
        self.dtype = torch.float16 if use_fp16 else torch.float32
        if use_fp16:
            for m in self.blocks.modules():
                if isinstance(m, (nn.Linear, SubMConv3d)):
                    m.half()

    @property
    def num_upsamplings(self) -> int:
        return len(self.blocks) - 1

    def _check_guide(self, guide_subs):
        if guide_subs is not None and len(guide_subs) != self.num_upsamplings:
            raise ValueError(f"expected {self.num_upsamplings} guide subdivisions, got {len(guide_subs)}")

    def forward(self, x: SparseTensor, guide_subs: list[SparseTensor] | None = None, return_subs: bool = False):
        """Raw per-voxel outputs [N_vox, out_channels] at 16x the latent grid (and the subdivision logits of
        the 4 C2S blocks, each on the coords entering that block, when `return_subs`)."""
        self._check_guide(guide_subs)
        h = x.replace(self.from_latent(x.feats).to(self.dtype))
        subs = []
        for s, stage in enumerate(self.blocks):
            for block in stage:
                if isinstance(block, SparseResBlockC2S3d):
                    sub = block.subdivision(h, None if guide_subs is None else guide_subs[s])
                    if self.pred_subdiv:
                        subs.append(sub)
                    h = block(h, sub)
                else:
                    h = block(h)
        h = h.replace(F.layer_norm(h.feats.to(x.dtype), h.feats.shape[-1:]))
        h = h.replace(self.output_layer(h.feats))
        return (h, subs) if return_subs else h

    @torch.no_grad()
    def upsample(self, x: SparseTensor, upsample_times: int) -> torch.Tensor:
        """Coords int32 [M, 4] after `upsample_times` C2S blocks (the LR -> HR cascade uses 4). Only the
        subdivision of the last of those blocks is evaluated; its convolutions cannot change the coords."""
        if not 1 <= upsample_times <= self.num_upsamplings:
            raise ValueError(f"upsample_times must be in [1, {self.num_upsamplings}], got {upsample_times}")
        h = x.replace(self.from_latent(x.feats).to(self.dtype))
        for s in range(upsample_times):
            *convnexts, c2s = self.blocks[s]
            for block in convnexts:
                h = block(h)
            sub = c2s.subdivision(h, None)
            if s == upsample_times - 1:
                return channel_to_space(h, None if sub is None else sub.feats > 0)[2]
            h = c2s(h, sub)


class FlexiDualGridVaeDecoder(SparseUnetVaeDecoder):
    """Shape decoder: 7 outputs per voxel -> dual vertex offset (3), edge-crossing flags (3), split weight (1)."""

    def __init__(self, resolution: int, model_channels: list[int], latent_channels: int, num_blocks: list[int],
                 block_type: list[str], up_block_type: list[str], block_args: list[dict] | None = None,
                 use_fp16: bool = False, voxel_margin: float = 0.5):
        super().__init__(7, model_channels, latent_channels, num_blocks, block_type, up_block_type, block_args,
                         use_fp16, pred_subdiv=True)
        self.resolution = resolution
        self.voxel_margin = voxel_margin

    def set_resolution(self, resolution: int):
        """Grid size of the decoded voxels (16x the latent grid); sets the mesh's voxel size."""
        self.resolution = resolution

    def forward(self, x: SparseTensor, guide_subs: list[SparseTensor] | None = None, return_subs: bool = False):
        """One `VoxelMesh` per batch item (attrs None), plus the subdivision logits when `return_subs`."""
        h, subs = super().forward(x, guide_subs, return_subs=True)
        meshes = [self.to_mesh(h.coords[rows, 1:], h.feats[rows]) for rows in h.layout]
        return (meshes, subs) if return_subs else meshes

    def to_mesh(self, coords: torch.Tensor, raw: torch.Tensor) -> VoxelMesh:
        """Mesh of one batch item from its voxel coords [N, 3] and raw decoder outputs [N, 7]."""
        m = self.voxel_margin
        offsets = (1 + 2 * m) * torch.sigmoid(raw[:, 0:3]) - m       # in (-m, 1 + m) voxel units
        vertices, faces = flexible_dual_grid_to_mesh(coords, offsets, raw[:, 3:6] > 0, F.softplus(raw[:, 6]),
                                                     self.resolution)
        return VoxelMesh(vertices, faces, coords, None, 1.0 / self.resolution)

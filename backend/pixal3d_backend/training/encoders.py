"""The VAE encoders that the official release does not ship, built as mirror images of our decoders.

* `SparseStructureEncoder` (TRELLIS v1 design): dense occupancy [B, 1, 64^3] -> ResBlocks and strided 2x2x2
  convs -> (mean, logvar) [B, latent, 16^3]; the mirror of `SparseStructureDecoder` (same `ResBlock3d`).
* `SparseUnetVaeEncoder` (TRELLIS.2 design): per-voxel inputs at the decoded resolution -> ConvNeXt blocks and
  space-to-channel residual blocks (the exact inverse of the decoder's C2S) -> (mean, logvar) on the latent
  tokens, 2^levels coarser. `FlexiDualGridVaeEncoder` is the shape instance (7 flexible-dual-grid inputs).

Both return the posterior parameters; sampling and the KL term live in `losses.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.norms import LayerNorm32
from ..models.sparse_vae import SparseConvNeXtBlock3d
from ..models.ss_decoder import ChannelLayerNorm32, ResBlock3d
from ..sparse import SparseTensor
from ..sparse_conv import SubMConv3d
from .voxels import space_to_channel


class SparseStructureEncoder(nn.Module):
    """channels run fine -> coarse, e.g. [16, 32, 64] for 64^3 -> 16^3 (the decoder's list reversed)."""

    def __init__(self, in_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2):
        super().__init__()
        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(nn.Conv3d(ch, channels[i + 1], 2, stride=2))
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[-1]) for _ in range(num_res_blocks_middle)])
        self.out_layer = nn.Sequential(ChannelLayerNorm32(channels[-1], eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(channels[-1], 2 * latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        mean, logvar = self.out_layer(self.middle_block(h)).chunk(2, dim=1)
        return mean, logvar


class SparseResBlockS2C3d(nn.Module):
    """Residual block that halves the resolution, the inverse of `SparseResBlockC2S3d`: conv to Co/8 channels
    at the children, gather each 2x2x2 block into one parent (space-to-channel), conv at the parents, plus the
    space-to-channel of the input averaged down to Co channels as the skip."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        if out_channels % 8 or (8 * channels) % out_channels:
            raise ValueError(f"S2C block needs out % 8 == 0 and (8 in) % out == 0, got {channels}->{out_channels}")
        self.out_channels = out_channels
        self.norm1 = LayerNorm32(channels, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SubMConv3d(channels, out_channels // 8)
        self.conv2 = SubMConv3d(out_channels, out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = space_to_channel(self.conv1(x.replace(F.silu(self.norm1(x.feats)))))
        skip = space_to_channel(x).feats
        skip = skip.reshape(skip.shape[0], self.out_channels, -1).mean(-1)
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        return h.replace(h.feats + skip)


class SparseUnetVaeEncoder(nn.Module):
    """model_channels / num_blocks run fine -> coarse (the decoder's lists reversed); one S2C block between
    consecutive stages, so the latent grid is 2^(len(model_channels) - 1) times coarser than the input."""

    def __init__(self, in_channels: int, model_channels: list[int], latent_channels: int, num_blocks: list[int]):
        super().__init__()
        self.input_layer = nn.Linear(in_channels, model_channels[0])
        self.blocks = nn.ModuleList()
        for s, ch in enumerate(model_channels):
            stage = nn.ModuleList(SparseConvNeXtBlock3d(ch) for _ in range(num_blocks[s]))
            if s < len(model_channels) - 1:
                stage.append(SparseResBlockS2C3d(ch, model_channels[s + 1]))
            self.blocks.append(stage)
        self.to_latent = nn.Linear(model_channels[-1], 2 * latent_channels)

    @property
    def num_downsamplings(self) -> int:
        return len(self.blocks) - 1

    def forward(self, x: SparseTensor) -> tuple[SparseTensor, torch.Tensor]:
        """-> (mean on the latent tokens, logvar [M, latent]); token coords sorted (b, x, y, z)."""
        h = x.replace(self.input_layer(x.feats))
        for stage in self.blocks:
            for block in stage:
                h = block(h)
        mean, logvar = self.to_latent(F.layer_norm(h.feats, h.feats.shape[-1:])).chunk(2, dim=1)
        return h.replace(mean), logvar


class FlexiDualGridVaeEncoder(SparseUnetVaeEncoder):
    """Shape encoder: 7 inputs per flexible-dual-grid voxel (see `batches.shape_inputs`)."""

    def __init__(self, model_channels: list[int], latent_channels: int, num_blocks: list[int]):
        super().__init__(7, model_channels, latent_channels, num_blocks)


ENCODERS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in
                                        (SparseStructureEncoder, SparseUnetVaeEncoder, FlexiDualGridVaeEncoder)}

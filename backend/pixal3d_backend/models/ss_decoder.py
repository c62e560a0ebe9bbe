"""Sparse-structure decoder (TRELLIS v1 `ss_dec_conv3d_16l8_fp16`): dense latent [B,8,16^3] -> occupancy logits.

input_layer -> middle ResBlocks -> per stage: ResBlocks, then a conv + 3-D pixel shuffle doubling the grid ->
LayerNorm -> SiLU -> out conv. With `use_fp16` the convs of `blocks`/`middle_block` hold fp16 weights and
run in fp16; `input_layer`, `out_layer` and every norm stay fp32 (norms compute in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel dim of [B, C, X, Y, Z], computed in fp32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.permute(0, 2, 3, 4, 1).float())
        return y.permute(0, 4, 1, 2, 3).to(x.dtype)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm32(channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm32(channels, eps=1e-5)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """out[b, c, s*x+i, s*y+j, s*z+k] = in[b, c*s^3 + i*s^2 + j*s + k, x, y, z]."""
    b, c, nx, ny, nz = x.shape
    c_out = c // scale ** 3
    x = x.reshape(b, c_out, scale, scale, scale, nx, ny, nz).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c_out, nx * scale, ny * scale, nz * scale)


class UpsampleBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        if norm_type != "layer":
            raise ValueError(f"only norm_type 'layer' is used by the released decoder, got {norm_type!r}")
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0]) for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(ChannelLayerNorm32(channels[-1], eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        self.dtype = torch.float16 if use_fp16 else torch.float32
        if use_fp16:
            for m in [*self.middle_block.modules(), *self.blocks.modules()]:
                if isinstance(m, nn.Conv3d):
                    m.half()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(latent).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(latent.dtype))


def occupancy_to_coords(logits: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """Official post-processing of the decoder logits [B,1,R,R,R] (R = 64) to the occupied cells of the
    `resolution`^3 grid: `logits > 0`, max-pool by R // resolution, argwhere in row-major order ->
    int32 [N, 4] = (b, x, y, z)."""
    ratio = logits.shape[2] // resolution
    occupied = F.max_pool3d((logits > 0).float(), kernel_size=ratio, stride=ratio) > 0.5
    return torch.argwhere(occupied)[:, [0, 2, 3, 4]].int().contiguous()

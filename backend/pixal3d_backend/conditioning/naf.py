"""NAF (valeoai/NAF, "Neighborhood Attention Filtering"): image-guided upsampling of a low-resolution feature
map (spec §1.4), re-implemented for inference with the release checkpoint's key names.

The only learned part is an image encoder. Its output (with 2-D RoPE) gives the queries at the target size
T x T; the keys are the same map average-pooled to the feature-map size and repeated back to T (nearest);
the values are the low-res features repeated to T. Each output pixel then attends to a 9 x 9 neighbourhood,
dilated by T // h so the window spans 9 distinct low-res cells. The attention has no projections, so the
output is a convex combination of low-res feature vectors, weighted by image similarity. When T is a multiple of
the feature-map size, keys and values are passed per low-res cell (`kv_repeat`): the Triton kernel never builds
their repeats (see `pixal3d_kernels.neighborhood_attention`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pixal3d_kernels.neighborhood_attention import neighborhood_attention_2d, neighborhood_indices  # noqa: F401
from torch import nn


# ---------------------------------------------------------------------------------------------------------
# NAF image encoder
# ---------------------------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, without a residual connection (as released)."""

    def __init__(self, channels: int, kernel_size: int, groups: int = 8):
        super().__init__()
        conv = dict(kernel_size=kernel_size, padding=kernel_size // 2, padding_mode="reflect")
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, **conv)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, **conv)

    def forward(self, x):
        x = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(x)))


def conv_encoder(in_channels: int, channels: int, kernel_size: int, num_blocks: int) -> nn.Sequential:
    """Stem conv followed by `num_blocks` EncoderBlocks (keys `<i>.weight`, `<i>.norm1.weight`, ...)."""
    stem = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect")
    return nn.Sequential(stem, *[EncoderBlock(channels, kernel_size) for _ in range(num_blocks)])


class AxialRoPE2d(nn.Module):
    """DINOv3-style 2-D rotary embedding without learned weights, applied per head to a [B, C, H, W] map.

    Pixel centres are normalised to [-1, 1] separately per axis. For head dim D the first D/2 angles are
    [row frequencies (D/4) | column frequencies (D/4)], repeated twice; channel i is rotated with channel
    i + D/2 ("rotate half" pairing).
    """

    def __init__(self, dim: int, num_heads: int, base: float):
        super().__init__()
        if dim % (4 * num_heads):
            raise ValueError(f"RoPE dim {dim} must be divisible by 4 * num_heads = {4 * num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        # Persistent: the release checkpoint stores it (`image_encoder.rope.periods`).
        self.register_buffer("periods", base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ch = (torch.arange(H, device=x.device, dtype=torch.float32) + 0.5) / H * 2 - 1
        cw = (torch.arange(W, device=x.device, dtype=torch.float32) + 0.5) / W * 2 - 1
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).reshape(H * W, 2)
        angles = (2 * math.pi * coords[:, :, None] / self.periods).flatten(1).tile(2)   # [HW, head_dim]
        x = x.reshape(B, self.num_heads, C // self.num_heads, H * W).transpose(2, 3)   # [B, n, HW, d]
        first, second = x.chunk(2, -1)
        x = x * angles.cos() + torch.cat([-second, first], -1) * angles.sin()
        return x.transpose(2, 3).reshape(B, C, H, W)


class ImageEncoder(nn.Module):
    """Guide-image encoder: a 1x1 (colour) and a 3x3 (local structure) conv branch, concatenated, pooled to the
    output size, then RoPE."""

    def __init__(self, dim: int, heads_rope: int, rope_base: float, img_layers: int):
        super().__init__()
        self.encoder = conv_encoder(3, dim // 2, kernel_size=1, num_blocks=img_layers)
        self.sem_encoder = conv_encoder(3, dim // 2, kernel_size=3, num_blocks=img_layers)
        self.rope = AxialRoPE2d(dim, heads_rope, rope_base)

    def forward(self, image: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        th, tw = output_size
        if image.shape[-2] > 4 * th or image.shape[-1] > 4 * tw:
            # Very large guides are first shrunk to at most 4x the output size (bounds the conv cost).
            size = (min(image.shape[-2], 4 * th, 4 * tw), min(image.shape[-1], 4 * tw, 4 * th))
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        x = torch.cat([self.encoder(image), self.sem_encoder(image)], 1)
        return self.rope(F.adaptive_avg_pool2d(x, output_size))


class NAF(nn.Module):
    """`NAF()` of valeoai/NAF (torch.hub "naf"); forward(image [B,3,S,S] in [0,1], features [B,C,h,w],
    output_size (T, T)) -> [B, C, T, T]."""

    def __init__(self, dim: int = 256, heads_attn: int = 4, heads_rope: int = 4, kernel_size: int = 9,
                 rope_base: float = 100.0, rope_rescale: float = 2.0, img_layers: int = 2):
        super().__init__()
        # rope_rescale only jitters coordinates during training; kept for the official constructor signature.
        del rope_rescale
        if dim % heads_attn:
            raise ValueError(f"dim {dim} must be divisible by heads_attn {heads_attn}")
        self.heads_attn = heads_attn
        self.kernel_size = kernel_size
        self.image_encoder = ImageEncoder(dim, heads_rope, rope_base, img_layers)

    def _heads(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, C, h, w] -> nearest-exact repeat to `size` -> [B, H, W, heads, C/heads]."""
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="nearest-exact")
        B, C, H, W = x.shape
        return x.reshape(B, self.heads_attn, C // self.heads_attn, H, W).permute(0, 3, 4, 1, 2)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        output_size = tuple(int(s) for s in output_size)
        queries = self.image_encoder(image, output_size)
        cells = tuple(features.shape[-2:])
        keys = F.adaptive_avg_pool2d(queries, cells)
        dilation = (output_size[0] // cells[0], output_size[1] // cells[1])
        q = self._heads(queries, output_size)
        if output_size == (cells[0] * dilation[0], cells[1] * dilation[1]):
            # nearest-exact by an integer factor repeats every cell: keys and values stay per cell
            k, v = self._heads(keys, cells), self._heads(features.to(q.dtype), cells)
            out = neighborhood_attention_2d(q, k, v, self.kernel_size, dilation, kv_repeat=dilation)
        else:
            k, v = self._heads(keys, output_size), self._heads(features.to(q.dtype), output_size)
            out = neighborhood_attention_2d(q, k, v, self.kernel_size, dilation)     # [B, T, T, heads, d]
        B, H, W = out.shape[:3]
        return out.permute(0, 3, 4, 1, 2).reshape(B, -1, H, W)

"""Filling of texels no triangle covers: a short dilation, then push-pull.

The dilation copies the mean of valid 8-neighbours outwards a few texels, so chart borders keep their own
colour under bilinear filtering and in the first mip levels. Push-pull (mask-weighted mip pyramid, filled back
down) then gives every remaining texel a smooth value from its surroundings, so lower mips of the atlas do not
bleed a background colour into the charts. Both are plain pooling ops, vectorised on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _dilate_once(img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask[None, None].float()
    total = F.avg_pool2d(F.pad(img[None] * m, (1, 1, 1, 1)), 3, 1)[0]
    weight = F.avg_pool2d(F.pad(m, (1, 1, 1, 1)), 3, 1)[0]
    grow = (weight[0] > 0) & ~mask
    img = torch.where(grow[None], total / weight.clamp_min(1e-12), img)
    return img, mask | grow


def _push_pull(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if min(img.shape[1:]) <= 1 or bool(mask.all()):
        return img
    m = mask[None, None].float()
    total = F.avg_pool2d(img[None] * m, 2, ceil_mode=True)[0]
    weight = F.avg_pool2d(m, 2, ceil_mode=True)[0]
    coarse_mask = weight[0] > 0
    coarse = _push_pull(total / weight.clamp_min(1e-12), coarse_mask)
    up = F.interpolate(coarse[None], size=img.shape[1:], mode="bilinear", align_corners=False)[0]
    return torch.where(mask[None], img, up)


def inpaint(img: torch.Tensor, mask: torch.Tensor, dilation: int = 4) -> torch.Tensor:
    """img [C, H, W] float, mask [H, W] bool of valid texels. Returns img with every texel filled."""
    if not bool(mask.any()):
        return img
    for _ in range(dilation):
        img, mask = _dilate_once(img, mask)
    return _push_pull(img, mask)

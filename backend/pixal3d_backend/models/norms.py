"""The official `LayerNorm32`: LayerNorm with fp32 statistics whatever the activation dtype, returned in the input
dtype; shared by the flow transformers and the sparse VAEs. On CUDA at inference it runs `pixal3d_kernels`' fused
kernel, which also applies a DiT block's adaLN modulation in the same pass (`modulated`)."""
from __future__ import annotations

import torch
from torch import nn

from pixal3d_kernels.dit_pointwise import modulated_layer_norm


class LayerNorm32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return modulated_layer_norm(x, self.weight, self.bias, eps=self.eps)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rows_per_group: int
                  ) -> torch.Tensor:
        """`self(x) * (1 + scale) + shift` (in x's dtype) with per-group vectors [G, C] (`dit_pointwise`)."""
        return modulated_layer_norm(x, self.weight, self.bias, shift, scale, rows_per_group, self.eps)

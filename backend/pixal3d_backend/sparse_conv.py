"""3x3x3 submanifold sparse convolution module with the official (flex_gemm) weight layout.

`SubMConv3d` holds `<p>.weight` [Co, 3, 3, 3, Ci] and `<p>.bias` [Co] and computes the convolution with one of
three backends (the computation itself, its neighbour map and their kernels live in `pixal3d_kernels.sparse_conv`):
  * "torch": the plain-PyTorch reference; runs anywhere, keeps autograd. Default on CPU.
  * "triton": `pixal3d_kernels`' Triton neighbour map and implicit-GEMM kernel for inference (anything that needs
    a gradient still runs the reference). Default on CUDA without spconv.
  * "spconv": `spconv.pytorch` kernels (the backend the fixtures were produced with). Default on CUDA when
    installed. On CPU spconv is forward-only and races with >1 thread (see shared/docs/gpu_notes.md), so CPU
    defaults to "torch".
The neighbour map (and the kernel's tiling plan of it) is cached in `SparseTensor.cache`, so every layer at one
resolution reuses it. `PIXAL3D_SPARSE_CONV=torch|triton|spconv` forces a backend.
"""
from __future__ import annotations

import os

import torch
from pixal3d_kernels import sparse_conv as kernels
from pixal3d_kernels.sparse_conv import KERNEL_OFFSETS, CoordinateIndex  # noqa: F401  (the backend's names)
from torch import nn

from .sparse import SparseTensor


def _backend(device: torch.device) -> str:
    forced = os.environ.get("PIXAL3D_SPARSE_CONV", "").strip().lower()
    if forced not in ("", "torch", "triton", "spconv"):
        raise ValueError(f"PIXAL3D_SPARSE_CONV must be 'torch', 'triton' or 'spconv', got {forced!r}")
    if forced:
        return forced
    if device.type == "cuda":
        try:
            import spconv.pytorch  # noqa: F401
            return "spconv"
        except ImportError:
            return "triton"
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
        backend = _backend(x.device)
        if backend == "spconv":
            return x.replace(self._spconv_forward(x))
        if backend == "torch":
            if "neighbor_map" not in x.cache:
                x.cache["neighbor_map"] = kernels.build_neighbor_map_reference(x.coords)
            return x.replace(kernels.submanifold_conv3d_reference(x.feats, x.cache["neighbor_map"], self.weight,
                                                                  self.bias))
        if "neighbor_map" not in x.cache:
            x.cache["neighbor_map"] = kernels.build_neighbor_map(x.coords)
        return x.replace(kernels.submanifold_conv3d(x.feats, x.cache["neighbor_map"], self.weight, self.bias,
                                                    cache=x.cache))

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

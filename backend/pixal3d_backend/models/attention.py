"""Attention building blocks of the flow transformers: q/k RMS norm, 3-D RoPE, self- and cross-attention.

Tokens come in two layouts and every module here accepts both:
  * dense:  [B, L, C], all samples have L tokens (the SS flow's r^3 grid, the 5 global condition tokens);
  * packed: [N, C], the tokens of variable-length samples stored one sample after the other (the SLat flows'
    sparse voxels). A `VarLenLayout` gives the per-sample lengths of the query and key/value sides.

`attention()` is the single place where softmax attention is computed, so a fused varlen kernel
(flash attention with cu_seqlens) replaces exactly one function.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pixal3d_kernels.dit_pointwise import rms_norm_rope


@dataclass(frozen=True)
class VarLenLayout:
    """Per-sample token counts of packed queries ([sum(q_lens), H, d]) and keys/values ([sum(kv_lens), H, d])."""
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]

    def __post_init__(self):
        if len(self.q_lens) != len(self.kv_lens):
            raise ValueError(f"{len(self.q_lens)} query samples but {len(self.kv_lens)} key/value samples")

    @property
    def uniform(self) -> bool:
        """All samples share one query length and one key length: the batch is a reshaped dense batch."""
        return len(set(self.q_lens)) <= 1 and len(set(self.kv_lens)) <= 1


SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sdpa_backend_order() -> list[SDPBackend] | None:
    """`PIXAL3D_SDPA` (comma-separated names of `SDPA_BACKENDS`, first preferred) or None for PyTorch's own order.
    Why a knob: cuDNN's attention is the fastest on Hopper but builds an execution plan for every new sequence
    length (a sparse flow's token count changes with every object), which flash attention does not."""
    names = [n.strip().lower() for n in os.environ.get("PIXAL3D_SDPA", "").split(",") if n.strip()]
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"PIXAL3D_SDPA: unknown attention backends {unknown}; known: {sorted(SDPA_BACKENDS)}")
    return [SDPA_BACKENDS[n] for n in names] or None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, d] in and out; SDPA wants heads before tokens."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    order = sdpa_backend_order() if q.is_cuda else None
    if order is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarLenLayout | None) -> torch.Tensor:
    """Full softmax attention with scale 1/sqrt(d), each sample attending only to its own keys.

    layout None: q [B, Lq, H, d], k/v [B, Lk, H, d] -> [B, Lq, H, d].
    layout:      q [Nq, H, d], k/v [Nk, H, d] packed as `layout` says -> [Nq, H, d].
    """
    if layout is None:
        return _sdpa(q, k, v)
    if layout.uniform:        # one batched call on a [B, L, H, d] view (always the case for batch size 1)
        b = len(layout.q_lens)
        return _sdpa(q.unflatten(0, (b, -1)), k.unflatten(0, (b, -1)), v.unflatten(0, (b, -1))).flatten(0, 1)
    # Variable lengths: one call per sample (few samples; a varlen kernel does this in one launch).
    per_sample = zip(q.split(layout.q_lens), k.split(layout.kv_lens), v.split(layout.kv_lens))
    return torch.cat([_sdpa(qi[None], ki[None], vi[None])[0] for qi, ki, vi in per_sample])


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of q or k: `normalize(x) * gamma[H, d] * sqrt(d)`, computed in fp32 (the gamma is read by
    `pixal3d_kernels.dit_pointwise.rms_norm_rope`, which fuses it with RoPE)."""

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))


def rope_phases(coords: torch.Tensor, head_dim: int, rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """Unit complex rotations complex64 [N, head_dim // 2] for integer 3-D coords [N, 3].

    Each axis gets head_dim // 6 frequencies f_j = rope_freq[0] / rope_freq[1] ** (j / (head_dim // 6)); the
    angles are [x*f, y*f, z*f], padded with zero angles (identity rotations) up to head_dim // 2 pairs.
    """
    freq_dim = head_dim // 2 // 3
    j = torch.arange(freq_dim, dtype=torch.float32, device=coords.device)
    freqs = rope_freq[0] / rope_freq[1] ** (j / freq_dim)
    angles = (coords.float()[:, :, None] * freqs).flatten(1)
    angles = F.pad(angles, (0, head_dim // 2 - angles.shape[1]))
    return torch.polar(torch.ones_like(angles), angles)


class _MultiHeadAttention(nn.Module):
    """What self- and cross-attention share: the head split, the optional q/k RMS norms and the output projection
    (attribute names are the official checkpoint keys)."""

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(channels, channels)

    def _normed(self, q: torch.Tensor, k: torch.Tensor, phases: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k [..., T, H, d] through the optional RMS norms, then RoPE by `phases` [T, d/2] (None: none)."""
        q_gamma, k_gamma = (self.q_rms_norm.gamma, self.k_rms_norm.gamma) if self.qk_rms_norm else (None, None)
        return rms_norm_rope(q, q_gamma, phases), rms_norm_rope(k, k_gamma, phases)


class SelfAttention(_MultiHeadAttention):
    """Multi-head self-attention with optional q/k RMS norm and RoPE (applied after the norm)."""

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool):
        super().__init__(channels, num_heads, qk_rms_norm)
        self.to_qkv = nn.Linear(channels, 3 * channels)

    def forward(self, x: torch.Tensor, phases: torch.Tensor | None, layout: VarLenLayout | None) -> torch.Tensor:
        """x [B, L, C] (layout None) or packed [N, C]; phases [L or N, d/2] or None for no RoPE."""
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        q, k = self._normed(q, k, phases)
        return self.to_out(attention(q, k, v, layout).flatten(-2))


class CrossAttention(_MultiHeadAttention):
    """Multi-head attention of the tokens to a dense context [B, M, Cc] (no RoPE)."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, qk_rms_norm: bool):
        super().__init__(channels, num_heads, qk_rms_norm)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_channels, 2 * channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, layout: VarLenLayout | None) -> torch.Tensor:
        """x [B, L, C] (layout None) or packed [N, C] (layout.kv_lens = (M,) * B); context [B, M, Cc]."""
        q = self.to_q(x).unflatten(-1, (self.num_heads, -1))
        k, v = self.to_kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(-3)
        q, k = self._normed(q, k)
        if layout is not None:
            k, v = k.flatten(0, 1), v.flatten(0, 1)
        return self.to_out(attention(q, k, v, layout).flatten(-2))

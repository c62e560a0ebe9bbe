"""The flow transformers (DiTs) of the Pixal3D cascade: one dense, three sparse, one shared block.

* `SparseStructureFlowModel`: dense, the tokens are the r^3 grid cells of the structure latent.
* `SLatFlowModel` (= official `ElasticSLatFlowModel` at inference): sparse, the tokens are the voxels of a
  `SparseTensor`; used for shape 512, shape 1024 and texture 1024.

Both run the same `FlowTransformer` on a token matrix: dense tokens are [B, L, C], sparse tokens are packed
[N, C]. A `TokenLayout` (RoPE phases + attention layouts, computed once per forward) tells the blocks which is
which. Forward (spec §4.1):

    h    = input_layer(x) (+ pos_emb with pe_mode "ape")   fp32, then cast to `dtype`
    mod  = adaLN_modulation(t_embedder(t))                shared by all blocks (share_mod)
    for each block:
        shift/scale/gate (msa, mlp) = (block.modulation + mod).chunk(6)
        h += gate_msa * SelfAttn(LN(h) * (1 + scale_msa) + shift_msa)         RoPE on q, k ("rope")
        h += CrossAttn(LN_affine(h), global tokens) + proj_linear(proj)      no gate (Pixal3D "proj" mode)
        h += gate_mlp * MLP(LN(h) * (1 + scale_mlp) + shift_mlp)
    out  = out_layer(layer_norm(h in input dtype))

Mixed precision follows the official `convert_to(dtype)`: only the Linear layers inside `blocks` hold `dtype`
weights; norms, RMS gammas, `blocks.i.modulation`, the embedders and the input/output layers stay fp32.
Module and parameter names are the official checkpoint keys, so `load_state_dict` is strict with no key map.

Positions: every released Pixal3D flow, and our default model's, uses RoPE (`pe_mode "rope"`), which tells attention
the *relative* offsets of tokens only: cells whose inputs are equal get the same update wherever they are, so along a
line of sight only the noise and the perspective drift of the lifted pixel say where a cell lies in depth. The
official dense class also has `pe_mode "ape"` (TRELLIS's structure flow): a fixed sinusoidal embedding of each cell's
absolute grid position added to the input tokens, and no RoPE. It is implemented for the structure flow so that
training can try it (`train.py --pe-mode ape`; BENCHMARKS.md, session 10: not better yet after ~5,800 steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..sparse import SparseTensor
from pixal3d_kernels.dit_pointwise import gated_residual

from .attention import CrossAttention, SelfAttention, VarLenLayout, rope_phases
from .norms import LayerNorm32

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one forward pass sit in `h`; built once and shared by every block.

    `self_attn is None` means dense tokens h [B, L, C]; otherwise h is packed [N, C] with per-sample lengths.
    Per-sample vectors (the adaLN modulation) apply to groups of `rows_per_group` consecutive rows of h: a
    sample's tokens, or single tokens (with the vectors gathered per token) when packed samples differ in length.
    """
    rope_phases: torch.Tensor | None     # complex64 [L or N, head_dim // 2]; None: no RoPE (pe_mode "ape")
    self_attn: VarLenLayout | None       # tokens -> tokens
    cross_attn: VarLenLayout | None      # tokens -> global condition tokens
    rows_per_group: int
    batch_index: torch.Tensor | None     # packed samples of unequal lengths: the sample of each row

    def per_group(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample vectors [B, K] -> one row per group of `rows_per_group` token rows."""
        return v if self.batch_index is None else v[self.batch_index]


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding [cos, sin] of the (already 1000x) timestep, then an MLP."""

    def __init__(self, channels: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class FeedForward(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)         # truncation, as official: 1536 * 5.3334 -> 8192
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ProjectAttention(nn.Module):
    """Pixal3D image conditioning ("proj" mode): cross-attention to the global image tokens plus a per-token
    linear map of the pixel-aligned features back-projected to this token's voxel (spec §2.5)."""

    def __init__(self, channels: int, cond_channels: int, proj_channels: int, num_heads: int, qk_rms_norm: bool):
        super().__init__()
        self.cross_attn_block = CrossAttention(channels, cond_channels, num_heads, qk_rms_norm)
        self.proj_linear = nn.Linear(proj_channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, proj: torch.Tensor,
                layout: VarLenLayout | None) -> torch.Tensor:
        return self.cross_attn_block(x, context, layout) + self.proj_linear(proj)


class ModulatedTransformerBlock(nn.Module):
    """Self-attention, image conditioning and MLP with adaLN modulation shared across blocks (share_mod)."""

    def __init__(self, channels: int, cond_channels: int, proj_channels: int, num_heads: int, mlp_ratio: float,
                 qk_rms_norm: bool, qk_rms_norm_cross: bool):
        super().__init__()
        self.norm1 = LayerNorm32(channels, eps=1e-6, elementwise_affine=False)
        self.norm2 = LayerNorm32(channels, eps=1e-6, elementwise_affine=True)
        self.norm3 = LayerNorm32(channels, eps=1e-6, elementwise_affine=False)
        self.self_attn = SelfAttention(channels, num_heads, qk_rms_norm)
        self.cross_attn = ProjectAttention(channels, cond_channels, proj_channels, num_heads, qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.modulation = nn.Parameter(torch.randn(6 * channels) / channels ** 0.5)   # per-block offset of `mod`

    def forward(self, h: torch.Tensor, mod: torch.Tensor, context: torch.Tensor, proj: torch.Tensor,
                tokens: TokenLayout) -> torch.Tensor:
        mod = tokens.per_group((self.modulation + mod).to(mod.dtype))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        rows = tokens.rows_per_group
        x = self.norm1.modulated(h, shift_msa, scale_msa, rows)
        h = gated_residual(h, gate_msa, self.self_attn(x, tokens.rope_phases, tokens.self_attn), rows)
        h = h + self.cross_attn(self.norm2(h), context, proj, tokens.cross_attn)
        x = self.norm3.modulated(h, shift_mlp, scale_mlp, rows)
        return gated_residual(h, gate_mlp, self.mlp(x), rows)


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """The official `AbsolutePositionEmbedder(channels, 3)` of integer grid coords [N, 3] -> [N, channels]: per axis,
    [sin(c f_j), cos(c f_j)] with f_j = 10000 ** (-j / F), j < F = channels // 6, the axes one after another,
    zero-padded to `channels`."""
    freq_dim = channels // 3 // 2
    freqs = 1.0 / 10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim)
    angles = coords.float().reshape(-1)[:, None] * freqs
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(len(coords), -1)
    return F.pad(embedding, (0, channels - embedding.shape[1]))


class FlowTransformer(nn.Module):
    """The DiT shared by the dense and the sparse flow. Constructor args are the official checkpoint-config
    args; only the configuration the released Pixal3D checkpoints use is implemented (pe_mode "rope", share_mod
    true, image_attn_mode "proj"), plus the dense class's pe_mode "ape" (a training option), and anything else is
    refused with a clear error."""
    PE_MODES = ("rope",)

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int,
                 out_channels: int, num_blocks: int, num_heads: int | None = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4, pe_mode: str = "rope", rope_freq: tuple[float, float] = (1.0, 10000.0),
                 dtype: str = "float32", use_checkpoint: bool = False, share_mod: bool = True,
                 initialization: str = "vanilla", qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False,
                 image_attn_mode: str = "proj", proj_in_channels: int | None = None):
        super().__init__()
        if pe_mode not in self.PE_MODES:
            raise ValueError(f"pe_mode {pe_mode!r} is not supported by {type(self).__name__}: use one of "
                             f"{self.PE_MODES} (every released Pixal3D flow uses 'rope')")
        if not share_mod:
            raise ValueError("share_mod=False is not supported: every Pixal3D flow shares adaLN_modulation")
        if image_attn_mode != "proj":
            raise ValueError(f"image_attn_mode {image_attn_mode!r} is not supported: released Pixal3D flows "
                             "use 'proj' (cross-attention to global tokens + per-block proj_linear)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if initialization not in ("vanilla", "scaled"):
            raise ValueError(f"initialization must be 'vanilla' or 'scaled', got {initialization!r}")
        self.num_heads = num_heads or model_channels // num_head_channels
        self.head_dim = model_channels // self.num_heads
        if self.head_dim * self.num_heads != model_channels:
            raise ValueError(f"model_channels {model_channels} is not divisible by num_heads {self.num_heads} "
                             "(head_dim)")
        if pe_mode == "rope" and (self.head_dim % 2 or self.head_dim < 6):
            raise ValueError(f"model_channels {model_channels} / num_heads {self.num_heads} must give an even "
                             "head_dim of at least 6 (3-D RoPE rotates channel pairs, >= 1 frequency per axis)")
        self.pe_mode = pe_mode
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.rope_freq = tuple(rope_freq)
        self.dtype = _DTYPES[dtype]
        self.use_checkpoint = use_checkpoint

        self.t_embedder = TimestepEmbedder(model_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerBlock(model_channels, cond_channels, proj_in_channels or cond_channels,
                                      self.num_heads, mlp_ratio, qk_rms_norm, qk_rms_norm_cross)
            for _ in range(num_blocks)])
        self.out_layer = nn.Linear(model_channels, out_channels)
        self._init_weights(initialization)
        for module in self.blocks.modules():      # official convert_to(dtype): Linear layers inside blocks only
            if isinstance(module, nn.Linear):
                module.to(self.dtype)

    def _init_weights(self, initialization: str) -> None:
        """Official initialisations (for training from scratch; loading a checkpoint overwrites them).
        'scaled': N(0, 2/(5C)) everywhere, residual outputs N(0, 1/(5*num_blocks*C)), unit-variance input layer.
        'vanilla': Xavier-uniform everywhere. Both: zero biases, N(0, 0.02) timestep MLP, zero adaLN and output."""
        c = self.model_channels
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if initialization == "scaled":
                    nn.init.normal_(m.weight, std=math.sqrt(2.0 / (5.0 * c)))
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if initialization == "scaled":
            for block in self.blocks:
                for out in (block.self_attn.to_out, block.cross_attn.cross_attn_block.to_out, block.mlp.mlp[2]):
                    nn.init.normal_(out.weight, std=1.0 / math.sqrt(5 * len(self.blocks) * c))
            nn.init.normal_(self.input_layer.weight, std=1.0 / math.sqrt(self.in_channels))
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in (self.adaLN_modulation[-1], self.out_layer):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, proj: torch.Tensor,
                 tokens: TokenLayout, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [.., Cin] tokens (dense or packed), t [B] (1000 * t), context [B, M, Cc], proj [.., Cp] aligned with x;
        positions: the absolute position embedding added to the input tokens (pe_mode "ape"), broadcast to them."""
        h = self.input_layer(x)
        if positions is not None:
            h = h + positions
        h = h.to(self.dtype)
        mod = self.adaLN_modulation(self.t_embedder(t)).to(self.dtype)
        context, proj = context.to(self.dtype), proj.to(self.dtype)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, mod, context, proj, tokens, use_reentrant=False)
            else:
                h = block(h, mod, context, proj, tokens)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])
        return self.out_layer(h)


class SparseStructureFlowModel(FlowTransformer):
    """Dense flow over the r^3 structure latent [B, Cin, r, r, r]; token order ix*r*r + iy*r + iz.

    The grid's positions are a persistent buffer, as in the official checkpoints: `rope_phases` (complex64
    [r^3, head_dim/2]) with pe_mode "rope", `pos_emb` ([r^3, model_channels]) with "ape". Both are deterministic,
    so a loaded copy equals the recomputed one. Constructor: the official args, see `FlowTransformer`.
    """
    PE_MODES = ("rope", "ape")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = self.resolution
        grid = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
        if self.pe_mode == "rope":
            self.register_buffer("rope_phases", rope_phases(grid, self.head_dim, self.rope_freq))
        else:
            self.register_buffer("pos_emb", absolute_position_embedding(grid, self.model_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [B, Cin, r, r, r], t [B] (1000 * t), cond {'global': [B, M, Cc], 'proj': [B, r^3, Cp]}."""
        r = self.resolution
        if tuple(x.shape[1:]) != (self.in_channels, r, r, r):
            raise ValueError(f"x must be [B, {self.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        if cond["proj"].shape[:2] != (x.shape[0], r ** 3):
            raise ValueError(f"cond['proj'] must be [B, {r ** 3}, C] (one row per grid cell), "
                             f"got {tuple(cond['proj'].shape)}")
        ape = self.pe_mode == "ape"
        tokens = TokenLayout(None if ape else self.rope_phases, self_attn=None, cross_attn=None,
                             rows_per_group=r ** 3, batch_index=None)
        h = self._denoise(x.flatten(2).transpose(1, 2), t, cond["global"], cond["proj"], tokens,
                          self.pos_emb if ape else None)
        return h.transpose(1, 2).reshape(x.shape[0], self.out_channels, r, r, r)


class SLatFlowModel(FlowTransformer):
    """Sparse flow over structured latents; RoPE from the integer voxel coords, attention within each sample.
    `resolution` is informational. Constructor: the official args, see `FlowTransformer`."""

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: dict, concat_cond: SparseTensor | None = None
                ) -> SparseTensor:
        """x: noisy latent; cond {'global': [B, M, Cc], 'proj': SparseTensor [N, Cp] on x's coords};
        concat_cond (texture flow): features appended after x's channels. Returns the velocity on x's coords."""
        feats = x.feats
        if concat_cond is not None:
            if concat_cond.feats.shape[0] != feats.shape[0]:
                raise ValueError(f"concat_cond has {concat_cond.feats.shape[0]} rows, x has {feats.shape[0]}")
            feats = torch.cat([feats, concat_cond.feats], dim=-1)
        if feats.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (x then concat_cond), got {feats.shape[1]}")
        proj, context = cond["proj"], cond["global"]
        if proj.feats.shape[0] != feats.shape[0]:
            raise ValueError(f"cond['proj'] has {proj.feats.shape[0]} rows, x has {feats.shape[0]}")
        tokens = self._token_layout(x, context.shape[1])
        if not t.shape[0] == context.shape[0] == len(tokens.self_attn.q_lens):
            raise ValueError(f"batch sizes differ: x {len(tokens.self_attn.q_lens)}, t {t.shape[0]}, "
                             f"cond['global'] {context.shape[0]}")
        return x.replace(self._denoise(feats, t, context, proj.feats, tokens))

    def _token_layout(self, x: SparseTensor, context_len: int) -> TokenLayout:
        """RoPE phases and attention layouts of x's coords, cached in the coords' shared cache (so a whole
        sampling run computes them once)."""
        key = ("flow_token_layout", self.head_dim, self.rope_freq, context_len)
        if key not in x.cache:
            lens = tuple(s.stop - s.start for s in x.layout)
            equal = len(set(lens)) == 1          # one sample, or a CFG pair of one sample
            x.cache[key] = TokenLayout(
                rope_phases=rope_phases(x.coords[:, 1:], self.head_dim, self.rope_freq),
                self_attn=VarLenLayout(lens, lens),
                cross_attn=VarLenLayout(lens, (context_len,) * len(lens)),
                rows_per_group=lens[0] if equal else 1,
                batch_index=None if equal else x.batch_index)
        return x.cache[key]

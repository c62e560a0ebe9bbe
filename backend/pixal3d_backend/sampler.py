"""Flow-matching Euler sampler with classifier-free guidance, a guidance interval and CFG rescale.

Semantics of the official `FlowEulerGuidanceIntervalSampler(sigma_min=1e-5)` (spec §5):

    x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps,     the model predicts v = (1 - sigma_min) eps - x0
    t_i = r s_i / (1 + (r - 1) s_i),  s = linspace(1, 0, steps + 1) in float64    (r = rescale_t)
    x  <- x - (t - t_prev) v(x, 1000 t)
    v   = w v_cond + (1 - w) v_uncond    iff lo <= t <= hi (inclusive), else v = v_cond (a single pass);
          w = 1 (0) is a single conditional (unconditional) pass

The schedule stays in Python float64: with rescale_t = 3 it hits t = 0.6 exactly, and CFG must run there.
Latents are dense tensors or `SparseTensor`s; the arithmetic runs on the feature tensors either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .sparse import SparseTensor

# Per-stage sampler parameters of the official inference (spec §5); the one source of truth for the pipeline,
# the server and the CLI. Guidance strength 1 means a single conditional pass (no CFG) for the texture stage.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sparse_structure": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.7,
                         "guidance_interval": (0.6, 1.0), "rescale_t": 5.0},
    "shape": {"steps": 12, "guidance_strength": 7.5, "guidance_rescale": 0.5,   # LR and HR shape stages
              "guidance_interval": (0.6, 1.0), "rescale_t": 3.0},
    "texture": {"steps": 12, "guidance_strength": 1.0, "guidance_rescale": 0.0,
                "guidance_interval": (0.6, 0.9), "rescale_t": 3.0},
}

Latent = torch.Tensor | SparseTensor


class Cancelled(Exception):
    """Raised by `FlowEulerGuidanceIntervalSampler.sample` when `should_cancel()` returns True between two steps."""


@dataclass
class SamplerResult:
    samples: Latent            # x at t = 0
    pred_x_t: list[Latent]     # x after each Euler step
    pred_x_0: list[Latent]     # x0 predicted at each step from the final (guided, rescaled) velocity
    t_seq: list[float]         # float64 timesteps t_0 = 1, ..., t_steps = 0


def timesteps(steps: int, rescale_t: float) -> list[float]:
    """The official schedule, in float64 and with the same operation order (exact at the CFG boundary)."""
    s = np.linspace(1, 0, steps + 1)
    return (rescale_t * s / (1 + (rescale_t - 1) * s)).tolist()


class FlowEulerGuidanceIntervalSampler:
    """The official sampler of all three stages: Euler steps, CFG inside the guidance interval, CFG rescale."""

    def __init__(self, sigma_min: float = 1e-5):
        self.sigma_min = sigma_min

    @torch.no_grad()
    def sample(self, model: Callable, noise: Latent, cond: dict, neg_cond: dict, steps: int,
               guidance_strength: float, guidance_rescale: float, guidance_interval: tuple[float, float],
               rescale_t: float, concat_cond: SparseTensor | None = None,
               on_step: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None, batch_cfg: bool = False) -> SamplerResult:
        """Integrates from `noise` (t = 1) to t = 0. `model(x, 1000 * t [B], cond[, concat_cond=])` returns the
        velocity in x's type. `on_step(i, steps)` is called after step i (0-based); `should_cancel()` is checked
        before every step and raises `Cancelled`.

        `batch_cfg` runs a guided step's conditional and unconditional passes as one forward on a batch of twice
        the samples (the same numbers up to floating-point reassociation, one weight read and larger matmuls);
        the official code runs two forwards, which the parity fixtures count. `cond`/`neg_cond` values must then be
        tensors or `SparseTensor`s on `noise`'s rows."""
        sparse = isinstance(noise, SparseTensor)
        batch = noise.batch_size if sparse else noise.shape[0]
        wrap = noise.replace if sparse else (lambda feats: feats)
        extra = {} if concat_cond is None else {"concat_cond": concat_cond}

        def velocity(x: torch.Tensor, t: float, c: dict) -> torch.Tensor:
            v = model(wrap(x), torch.full((batch,), 1000 * t, dtype=torch.float32, device=x.device), c, **extra)
            return v.feats if sparse else v

        if batch_cfg:
            pair = CfgPair(noise)
            pair_cond = {k: pair.stack(cond[k], neg_cond[k]) for k in cond}
            pair_extra = {k: pair.stack(v, v) for k, v in extra.items()}

            def both_velocities(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
                xx = pair.stack(wrap(x), wrap(x))
                v = model(xx, torch.full((2 * batch,), 1000 * t, dtype=torch.float32, device=x.device), pair_cond,
                          **pair_extra)
                return pair.split(v)
        else:
            def both_velocities(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
                return velocity(x, t, cond), velocity(x, t, neg_cond)

        t_seq = timesteps(steps, rescale_t)
        x = noise.feats if sparse else noise
        pred_x_t, pred_x_0 = [], []
        for i, (t, t_prev) in enumerate(zip(t_seq[:-1], t_seq[1:])):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"sampling cancelled before step {i + 1}/{steps}")
            w = guidance_strength if guidance_interval[0] <= t <= guidance_interval[1] else 1.0
            if w == 1:
                v = velocity(x, t, cond)
            elif w == 0:
                v = velocity(x, t, neg_cond)
            else:
                v = self._guided_velocity(x, t, *both_velocities(x, t), w, guidance_rescale,
                                          noise if sparse else None)
            pred_x_0.append(wrap(self._x0(x, t, v)))
            x = x - (t - t_prev) * v
            pred_x_t.append(wrap(x))
            if on_step is not None:
                on_step(i, steps)
        return SamplerResult(samples=wrap(x), pred_x_t=pred_x_t, pred_x_0=pred_x_0, t_seq=t_seq)

    def _x0(self, x_t: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
        return implied_x0(x_t, t, v, self.sigma_min)

    def _guided_velocity(self, x_t: torch.Tensor, t: float, v_pos: torch.Tensor, v_neg: torch.Tensor,
                         strength: float, rescale: float, sparse_like: SparseTensor | None) -> torch.Tensor:
        """CFG, then CFG rescale: the guided x0 is scaled to the std of the conditional x0 (per sample) and
        blended with weight `rescale`; the velocity is recomputed from that x0."""
        v = strength * v_pos + (1 - strength) * v_neg
        if rescale <= 0:
            return v
        x0_pos, x0_cfg = self._x0(x_t, t, v_pos), self._x0(x_t, t, v)
        ratio = per_sample_std(x0_pos, sparse_like) / per_sample_std(x0_cfg, sparse_like)
        x0 = rescale * (x0_cfg * ratio) + (1 - rescale) * x0_cfg
        return ((1 - self.sigma_min) * x_t - x0) / (self.sigma_min + (1 - self.sigma_min) * t)


class CfgPair:
    """A batch of 2B samples made of a B-sample latent's conditional and unconditional copies, for one forward.

    Dense tensors are concatenated on the batch dimension; a `SparseTensor` gets its coordinates repeated with
    the batch index shifted by B (built once, so the per-coordinate caches are shared by every step)."""

    def __init__(self, like: Latent):
        self.sparse = isinstance(like, SparseTensor)
        if self.sparse:
            shift = torch.zeros(1, 4, dtype=like.coords.dtype, device=like.coords.device)
            shift[0, 0] = like.batch_size
            self.rows = like.coords.shape[0]
            self.template = SparseTensor(like.feats.new_empty(2 * self.rows, 0),
                                         torch.cat([like.coords, like.coords + shift]))

    def stack(self, a, b):
        if isinstance(a, SparseTensor):
            return self.template.replace(torch.cat([a.feats, b.feats]))
        return torch.cat([a, b])

    def split(self, v: Latent) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sparse:
            return v.feats[:self.rows], v.feats[self.rows:]
        return v.chunk(2)


def implied_x0(x_t, t, v, sigma_min: float):
    """The clean latent a velocity v at (x_t, t) points to: x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps
    and v = (1 - sigma_min) eps - x0 give x0 = (1 - sigma_min) x_t - (sigma_min + (1 - sigma_min) t) v."""
    return (1 - sigma_min) * x_t - (sigma_min + (1 - sigma_min) * t) * v


def per_sample_std(x: torch.Tensor, sparse_like: SparseTensor | None) -> torch.Tensor:
    """Std over all non-batch entries of each sample, broadcastable against x (the official conventions).
    Dense x [B, ...]: unbiased `torch.std`. Sparse feats [N, C] with `sparse_like`'s rows: population std over
    the sample's tokens x channels, returned per row."""
    if sparse_like is None:
        return x.std(dim=list(range(1, x.ndim)), keepdim=True)
    stds = torch.stack([x[rows].std(correction=0) for rows in sparse_like.layout])
    return sparse_like.per_row(stds)[:, None]

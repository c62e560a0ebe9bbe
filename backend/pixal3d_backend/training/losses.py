"""Training objectives of the default model.

VAEs (each returns a dict of named scalar terms; `total` is their weighted sum in `stages.py`):
  * sparse structure: BCE + soft Dice on the 64^3 occupancy logits;
  * shape: flexible-dual-grid terms on the decoded voxels (dual-vertex offsets L1, edge-flag BCE, split-weight
    L1 in log space) and BCE of every C2S stage's `to_subdiv` logits against the true child occupancy;
  * texture: L1 on the PBR attributes (decoder output x 0.5 + 0.5, as the pipeline reads it);
  * KL of the diagonal Gaussian posterior against N(0, I).

Flows: the official rectified-flow convention of the sampler (spec §5):
    x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps,    target v = (1 - sigma_min) eps - x0,
the model is called with 1000 t; t ~ logit-normal(1, 1) for the sparse structure and U(0, 1) for the
structured latents (spec §4.6); with probability `p_uncond` a sample's global tokens AND lifted features are
both zeroed, which is exactly the negative condition the sampler's CFG uses.

All randomness comes from an explicit CPU `torch.Generator` (moved to the device afterwards), so a step is a
pure function of (weights, batch, generator seed): this is what makes resumed training bit-identical.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..sampler import implied_x0
from ..sparse import SparseTensor

SIGMA_MIN = 1e-5          # official FlowEulerGuidanceIntervalSampler(sigma_min=1e-5); written to pipeline.json
P_UNCOND = 0.1            # official conditioning dropout of every flow


# -- VAE terms ----------------------------------------------------------------------------------------------

def gaussian_sample(mean: torch.Tensor, logvar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Reparameterised sample of N(mean, exp(logvar))."""
    eps = torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype)
    return mean + (0.5 * logvar).exp() * eps


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over latent entries."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def occupancy_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense occupancy [B, 1, R, R, R] -> per sample (BCE over its voxels [B], soft Dice [B], robust to the ~5 %
    fill)."""
    logits = logits.float().flatten(1)
    p = logits.sigmoid()
    t = target.float().flatten(1)
    dice = 1.0 - (2.0 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(1), dice


def occupancy_losses(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    bce, dice = occupancy_terms(logits, target)
    return {"bce": bce.mean(), "dice": dice.mean()}


def fdg_losses(raw: torch.Tensor, offset: torch.Tensor, intersected: torch.Tensor, split: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Flexible-dual-grid channels of the shape decoder (spec §4.3) against the targets of the same voxels.

    raw [N, 7]: offset logits 0:3 (offset = 2 sigmoid - 0.5, voxel units), edge-flag logits 3:6, split-weight
    pre-softplus 6. Targets: offset [N, 3] in voxel units, intersected [N, 3] bool, split [N] > 0.
    The split weight only matters through the ratio test `w0 w2 > w1 w3` of a quad, so it is fitted in log space.
    """
    raw = raw.float()
    pred_offset = 2.0 * raw[:, :3].sigmoid() - 0.5
    log_split = torch.log(F.softplus(raw[:, 6]) + 1e-6)
    return {"offset": F.l1_loss(pred_offset, offset.float()),
            "edge": F.binary_cross_entropy_with_logits(raw[:, 3:6], intersected.float()),
            "split": F.l1_loss(log_split, torch.log(split.float() + 1e-6))}


def subdivision_loss(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the C2S stages of the BCE between `to_subdiv` logits [N_s, 8] and true child occupancy."""
    terms = [F.binary_cross_entropy_with_logits(lg.float(), tg.float()) for lg, tg in zip(logits, targets, strict=True)]
    return torch.stack(terms).mean()


def pbr_loss(raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on the 6 PBR attributes in [0, 1]; the decoder output is read as `raw * 0.5 + 0.5` (spec §4.4)."""
    return F.l1_loss(raw.float() * 0.5 + 0.5, target.float())


# -- flow matching ------------------------------------------------------------------------------------------

def sample_timesteps(batch: int, schedule: str, gen: torch.Generator) -> torch.Tensor:
    """t in (0, 1) per sample: 'logit_normal' = sigmoid(N(1, 1)) (sparse structure), 'uniform' = U(0, 1)."""
    if schedule == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=gen) + 1.0)
    if schedule == "uniform":
        return torch.rand(batch, generator=gen)
    raise ValueError(f"unknown t schedule {schedule!r} (logit_normal or uniform)")


def drop_condition(cond: dict, keep: torch.Tensor) -> dict:
    """Zeroes the global tokens and the lifted features of the samples where `keep` [B] is False."""
    glob = cond["global"] * keep.to(cond["global"].dtype)[:, None, None]
    proj = cond["proj"]
    if isinstance(proj, SparseTensor):
        proj = proj.replace(proj.feats * proj.per_row(keep).to(proj.feats.dtype)[:, None])
    else:
        proj = proj * keep.to(proj.dtype)[:, None, None]
    return {"global": glob, "proj": proj}


class FlowMatching(NamedTuple):
    loss: torch.Tensor         # MSE between the predicted and the target velocity
    x0: torch.Tensor           # [B, C, r, r, r] or [N, C]: the clean latent the predicted velocity implies
    t: torch.Tensor            # [B] the samples' timesteps


def flow_matching(model: torch.nn.Module, x0: torch.Tensor | SparseTensor, cond: dict, t_schedule: str,
                  gen: torch.Generator, concat_cond: SparseTensor | None = None, p_uncond: float = P_UNCOND,
                  sigma_min: float = SIGMA_MIN) -> FlowMatching:
    """The model's velocity at a random (t, eps) against the target velocity, for a dense latent x0 [B, C, r, r, r]
    (sparse-structure flow) or a `SparseTensor` latent (structured-latent flows), and the clean latent the predicted
    velocity implies (`sampler.implied_x0`, what the sampler's CFG rescale reads)."""
    sparse = isinstance(x0, SparseTensor)
    feats = x0.feats if sparse else x0
    batch = x0.batch_size if sparse else x0.shape[0]
    t = sample_timesteps(batch, t_schedule, gen).to(feats.device)
    keep = (torch.rand(batch, generator=gen) >= p_uncond).to(feats.device)
    eps = torch.randn(feats.shape, generator=gen).to(feats.device, feats.dtype)
    t_b = x0.per_row(t)[:, None] if sparse else t.view(-1, *[1] * (feats.dim() - 1))
    x_t = (1.0 - t_b) * feats + (sigma_min + (1.0 - sigma_min) * t_b) * eps
    target = (1.0 - sigma_min) * eps - feats
    extra = {} if concat_cond is None else {"concat_cond": concat_cond}
    pred = model(x0.replace(x_t) if sparse else x_t, 1000.0 * t, drop_condition(cond, keep), **extra)
    velocity = (pred.feats if sparse else pred).float()
    return FlowMatching(F.mse_loss(velocity, target.float()), implied_x0(x_t.float(), t_b, velocity, sigma_min), t)


def structure_loss(logits: torch.Tensor, occupancy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Occupancy BCE + soft Dice of the structure decoded from a sparse-structure flow's implied clean latent,
    per sample weighted by 1 - t: the latent MSE weighs every latent direction alike, this weighs them by what they
    change in the decoded structure (the only thing inference reads of the latent); at t near 1 the implied latent is
    a blur of every structure the image allows, so that end is not pushed towards one decoded shape."""
    bce, dice = occupancy_terms(logits, occupancy)
    return ((1.0 - t.to(bce.device)) * (bce + dice)).mean()

"""The six training stages: what each one trains, what it reads from earlier stages, and its loss.

    ss_vae      ss_encoder + sparse_structure_decoder           occupancy 64^3 <-> 16^3 x 8 latent
    shape_vae   shape_encoder + shape_slat_decoder              FDG voxels 256^3 <-> 32^3 tokens x 16
    tex_vae     tex_encoder + tex_slat_decoder                  PBR voxels 256^3 <-> 32^3 tokens x 16
    ss_flow     sparse_structure_flow_model + image_cond_model_ss            (frozen ss_encoder)
    shape_flow  shape_slat_flow_model_512 + image_cond_model_shape_512       (frozen shape_encoder)
    tex_flow    tex_slat_flow_model_512 + image_cond_model_tex_512           (frozen shape/tex encoders)

The sparse decoders are trained teacher-forced: they decode exactly the true voxels (the structure follows the
true child occupancy at every C2S block) and the shape decoder's `to_subdiv` logits are fitted to it. Each flow
is trained jointly with its own small image encoder, whose gradients come through the lifted features and the
global tokens. A flow stage turns its pool into latents once (posterior means, normalised as pipeline.json
says), so its steps cost only the image encoder and the flow.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..conditioning.proj_grid import dense_grid_coords, lift_features
from ..models import build_model
from ..models.sparse_vae import SparseUnetVaeDecoder
from ..sparse import SparseTensor
from . import configs, losses
from .batches import Views, occupancy, shape_inputs, texture_inputs
from .encoders import ENCODERS
from .voxels import lookup, subdivision_guides

KL_WEIGHT = {"ss_vae": 1e-3, "shape_vae": 1e-6, "tex_vae": 1e-6}
VIEWS_PER_STEP = {"ss_vae": 16, "shape_vae": 8, "tex_vae": 8, "ss_flow": 32, "shape_flow": 32, "tex_flow": 32}
LEARNING_RATE = {"ss_vae": 1e-3, "shape_vae": 5e-4, "tex_vae": 5e-4, "ss_flow": 3e-4, "shape_flow": 3e-4,
                 "tex_flow": 3e-4}
DEPENDS = {"ss_vae": (), "shape_vae": (), "tex_vae": (), "ss_flow": ("ss_vae",), "shape_flow": ("shape_vae",),
           "tex_flow": ("shape_vae", "tex_vae")}
FLOW_STAGES = ("ss_flow", "shape_flow", "tex_flow")


def stage_config(key: str, overrides: dict | None = None) -> dict:
    """The `{"name", "args"}` of a network by its key: `overrides`, else configs.MODELS / ENCODER_MODELS."""
    return (overrides or {}).get(key) or configs.MODELS.get(key) or configs.ENCODER_MODELS[key]


def with_args(overrides: dict | None, key: str, **args) -> dict:
    """`overrides` with network `key`'s config (`stage_config`) taking `args` over its own constructor args."""
    cfg = stage_config(key, overrides)
    return {**(overrides or {}), key: {**cfg, "args": {**cfg["args"], **args}}}


def build(key: str, overrides: dict | None = None) -> nn.Module:
    cfg = stage_config(key, overrides)
    return ENCODERS[cfg["name"]](**cfg["args"]) if cfg["name"] in ENCODERS else build_model(cfg)


def trained_keys(stage: str) -> tuple[str, ...]:
    return {"ss_vae": ("ss_encoder", "sparse_structure_decoder"),
            "shape_vae": ("shape_encoder", "shape_slat_decoder"),
            "tex_vae": ("tex_encoder", "tex_slat_decoder"),
            "ss_flow": ("sparse_structure_flow_model", "image_cond_model_ss"),
            "shape_flow": ("shape_slat_flow_model_512", "image_cond_model_shape_512"),
            "tex_flow": ("tex_slat_flow_model_512", "image_cond_model_tex_512")}[stage]


# -- teacher forcing and conditioning -----------------------------------------------------------------------

@contextlib.contextmanager
def teacher_forcing(decoder: SparseUnetVaeDecoder, guides: list[SparseTensor]):
    """While active, the shape decoder's C2S block s keeps the children `guides[s]` says (> 0) instead of its
    own prediction; the yielded list collects the predicted `to_subdiv` logits, in block order."""
    predicted: list[torch.Tensor] = []

    def replace(_module, _inputs, output):
        predicted.append(output)
        return guides[len(predicted) - 1].feats.to(output.dtype)

    hooks = [m.to_subdiv.register_forward_hook(replace) for stage in decoder.blocks for m in stage
             if hasattr(m, "to_subdiv")]
    try:
        yield predicted
    finally:
        for h in hooks:
            h.remove()


def encode_images(extractor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable twin of `DinoV3ProjFeatureExtractor.encode` on image tensors [B, 3, S, S] in [0, 1]:
    -> (global tokens [B, 1 + registers, D], patch map [B, S/16, S/16, D] BHWC)."""
    tokens = extractor.dinov3_tokens(images)
    num_global = 1 + extractor.model.config.num_register_tokens
    side = extractor.image_size // extractor.model.config.patch_size
    return tokens[:, :num_global], tokens[:, num_global:].unflatten(1, (side, side))


def lift(extractor, patch_map: torch.Tensor, cameras: torch.Tensor, coords: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch features of the voxels `coords` [N, 4] (b, x, y, z) of a grid^3 seen by camera b -> [N, D]."""
    rows = [coords[:, 0] == b for b in range(patch_map.shape[0])]
    return torch.cat([lift_features(patch_map[b:b + 1], coords[r, 1:], grid, extractor.image_size,
                                    cameras[b, 0], distance=cameras[b, 1], mesh_scale=cameras[b, 2],
                                    layout="BHWC")[0] for b, r in enumerate(rows)])


def condition_dense(extractor, images, cameras, grid: int) -> dict:
    glob, patch_map = encode_images(extractor, images)
    coords = dense_grid_coords(grid, images.device)
    proj = lift_features(patch_map, coords, grid, extractor.image_size, cameras[:, 0], distance=cameras[:, 1],
                         mesh_scale=cameras[:, 2], layout="BHWC")
    return {"global": glob, "proj": proj}


def condition_sparse(extractor, images, cameras, tokens: SparseTensor) -> dict:
    glob, patch_map = encode_images(extractor, images)
    proj = lift(extractor, patch_map, cameras, tokens.coords, configs.TOKEN_RESOLUTION)
    return {"global": glob, "proj": tokens.replace(proj)}


# -- the stages ---------------------------------------------------------------------------------------------

class Stage:
    """`models` are trained and saved; `frozen` come from earlier stages. `prepare` turns a pool of generated
    views into what `losses` reads; `losses` returns named scalars with the optimised sum under 'loss'."""
    needs_images = False

    def __init__(self, name: str, frozen: dict[str, nn.Module], normalization: dict, overrides: dict | None = None):
        self.name = name
        self.models = nn.ModuleDict({k: build(k, overrides) for k in trained_keys(name)})
        self.frozen = frozen
        self.normalization = normalization          # {"shape": {"mean", "std"}, "tex": ...} from the VAE stages

    def prepare(self, pool: Views) -> Views:
        return pool

    def losses(self, batch: Views, gen: torch.Generator, training: bool = True) -> dict[str, torch.Tensor]:
        """`training` False: the terms of the batch as it is (validation), without a stage's augmentation."""
        raise NotImplementedError


class SSVae(Stage):
    def losses(self, batch, gen, training=True):
        occ = occupancy(batch)
        mean, logvar = self.models["ss_encoder"](occ)
        logits = self.models["sparse_structure_decoder"](losses.gaussian_sample(mean, logvar, gen))
        terms = losses.occupancy_losses(logits, occ)
        terms["kl"] = losses.kl_divergence(mean, logvar)
        terms["loss"] = terms["bce"] + terms["dice"] + KL_WEIGHT[self.name] * terms["kl"]
        return terms


class SparseVae(Stage):
    """Shape and texture VAEs: encode the true voxels, decode them teacher-forced."""

    def losses(self, batch, gen, training=True):
        encoder, decoder = self.models.values()
        x = shape_inputs(batch) if self.name == "shape_vae" else texture_inputs(batch)
        mean, logvar = encoder(x)
        z = mean.replace(losses.gaussian_sample(mean.feats, logvar, gen))
        guides, coords = subdivision_guides(mean.coords, batch.coords, decoder.num_upsamplings,
                                            configs.SHAPE_RESOLUTION)
        rows = lookup(coords, batch.coords, configs.SHAPE_RESOLUTION)
        s = {k: v[rows] for k, v in batch.sparse.items()}
        if self.name == "shape_vae":
            with teacher_forcing(decoder, guides) as predicted:
                raw = SparseUnetVaeDecoder.forward(decoder, z)
            terms = losses.fdg_losses(raw.feats, s["offsets"], s["intersected"], s["split"])
            terms["subdiv"] = losses.subdivision_loss(predicted, [g.feats > 0 for g in guides])
            recon = terms["offset"] + terms["edge"] + 0.1 * terms["split"] + terms["subdiv"]
        else:
            terms = {"pbr": losses.pbr_loss(decoder(z, guide_subs=guides).feats, s["attributes"])}
            recon = terms["pbr"]
        terms["kl"] = losses.kl_divergence(mean.feats, logvar)
        terms["loss"] = recon + KL_WEIGHT[self.name] * terms["kl"]
        return terms


def normalize(x: torch.Tensor, stats: dict) -> torch.Tensor:
    return (x - torch.tensor(stats["mean"], device=x.device)) / torch.tensor(stats["std"], device=x.device)


@torch.no_grad()
def flow_targets(pool: Views, frozen: dict, normalization: dict) -> Views:
    """Pool of views -> images, cameras and the latents (posterior means) flows learn to generate, one for each
    VAE encoder in `frozen`: dense "ss" [V, 8, 16, 16, 16] with the occupancy it encodes ("occupancy" [V, 1, 64,
    64, 64] bool: what the structure loss and the mirrored views read); sparse "shape" and "tex" (normalised) on the
    tokens."""
    dense = {k: pool.dense[k] for k in ("images", "cameras")}
    coords, sparse = pool.coords[:0], {}
    if "ss_encoder" in frozen:
        occ = occupancy(pool)
        dense["ss"], dense["occupancy"] = frozen["ss_encoder"](occ)[0], occ.bool()
    if "shape_encoder" in frozen:
        shape = frozen["shape_encoder"](shape_inputs(pool))[0]
        coords, sparse["shape"] = shape.coords, normalize(shape.feats, normalization["shape"])
    if "tex_encoder" in frozen:
        tex = frozen["tex_encoder"](texture_inputs(pool))[0]       # same tokens, same order as the shape latent
        sparse["tex"] = normalize(tex.feats, normalization["tex"])
    return Views(dense, coords, sparse)


def mirror_and_recolour(images: torch.Tensor, occupancy: torch.Tensor, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented sparse-structure views: each view mirrored left-right with probability 1/2, its image together with
    its occupancy [B, 1, R, R, R] along grid x (the crop camera looks at the cube's centre, so the mirrored object
    in the same camera is exactly the mirrored image, and grid x is the image's horizontal axis), and recoloured (a
    random permutation of the colour channels and a gain per channel in [0.7, 1.3]: the objects' albedo are random,
    their shapes are what the image must tell). Images are premultiplied on black, so the background stays black."""
    b = images.shape[0]
    flip = (torch.rand(b, generator=gen) < 0.5).to(images.device)
    permutation = torch.argsort(torch.rand(b, 3, generator=gen), 1).to(images.device)
    gains = (0.7 + 0.6 * torch.rand(b, 3, generator=gen)).to(images.device, images.dtype)
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    occupancy = torch.where(flip[:, None, None, None, None], occupancy.flip(2), occupancy)
    images = torch.gather(images, 1, permutation[:, :, None, None].expand_as(images)) * gains[:, :, None, None]
    return images.clamp(0.0, 1.0), occupancy


class FlowStage(Stage):
    """`augment` (sparse-structure flow): trains on `mirror_and_recolour`ed views, their latents encoded again by
    the frozen SS encoder. `structure_weight` (sparse-structure flow): adds that weight of `losses.structure_loss`,
    through the frozen SS decoder (`frozen["sparse_structure_decoder"]`)."""
    needs_images = True

    def __init__(self, name, frozen, normalization, overrides=None, augment: bool = False,
                 structure_weight: float = 0.0):
        if structure_weight and "sparse_structure_decoder" not in frozen:
            raise ValueError("the structure loss decodes through the frozen sparse_structure_decoder; none was given")
        super().__init__(name, frozen, normalization, overrides)
        self.augment, self.structure_weight = augment, structure_weight

    def prepare(self, pool: Views) -> Views:
        return flow_targets(pool, self.frozen, self.normalization)

    def losses(self, batch, gen, training=True):
        flow, extractor = self.models.values()
        if self.name == "ss_flow":
            return self.sparse_structure_losses(flow, extractor, batch, gen, training)
        images, cameras = batch.dense["images"], batch.dense["cameras"]
        if self.name == "shape_flow":
            x0 = batch.sparse_tensor("shape")
            fm = losses.flow_matching(flow, x0, condition_sparse(extractor, images, cameras, x0), "uniform", gen)
        else:
            x0 = batch.sparse_tensor("tex")
            fm = losses.flow_matching(flow, x0, condition_sparse(extractor, images, cameras, x0), "uniform", gen,
                                      concat_cond=batch.sparse_tensor("shape"))
        return {"loss": fm.loss}

    def sparse_structure_losses(self, flow, extractor, batch, gen, training):
        """{"loss", "flow": the latent flow matching term, "structure": `losses.structure_loss` when the views carry
        their occupancy and the SS decoder is at hand, and it is optimised or this is validation (where it is a
        number comparable across runs of any weight; a training step that does not optimise it skips the decode)}."""
        images, cameras, latent = batch.dense["images"], batch.dense["cameras"], batch.dense["ss"]
        occ = batch.dense.get("occupancy")
        if occ is None and (self.augment or self.structure_weight):
            raise ValueError("these views carry no occupancy (a pool written before it was stored); write the pool "
                             "again with python -m pixal3d_backend.training.flow_pool")
        if self.augment and training:
            images, occ = mirror_and_recolour(images, occ, gen)
            with torch.no_grad():
                latent = self.frozen["ss_encoder"](occ.float())[0]
        cond = condition_dense(extractor, images, cameras, configs.SS_LATENT_RESOLUTION)
        fm = losses.flow_matching(flow, latent, cond, "logit_normal", gen)
        terms = {"loss": fm.loss, "flow": fm.loss}
        decoder = self.frozen.get("sparse_structure_decoder")
        if decoder is not None and occ is not None and (self.structure_weight or not training):
            terms["structure"] = losses.structure_loss(decoder(fm.x0), occ, fm.t)
            terms["loss"] = fm.loss + self.structure_weight * terms["structure"]
        return terms


STAGE_CLASSES = {"ss_vae": SSVae, "shape_vae": SparseVae, "tex_vae": SparseVae,
                 "ss_flow": FlowStage, "shape_flow": FlowStage, "tex_flow": FlowStage}

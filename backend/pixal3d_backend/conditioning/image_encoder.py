"""Image conditioning of the flows (spec §1.4): DINOv3 tokens, optionally NAF-upsampled, lifted onto voxels.

`DinoV3ProjFeatureExtractor` keeps the official constructor arguments and state_dict keys (`model.*` =
transformers `DINOv3ViTModel`, `naf_model.*` = NAF). It is used in two steps so that no dense R^3 x C grid is
ever built:

    encoded = extractor.encode([image])                                  # once per image
    feats = extractor.lift(encoded, coords, grid_resolution, camera)     # [N, C] for the active voxels

`forward` is the official dense call (all R^3 voxels) on top of the same two steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from pixal3d_backend.conditioning.naf import NAF
from pixal3d_backend.conditioning.proj_grid import (camera_to_world, dense_grid_coords, lift_features,
                                                    lift_features_multiview)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncodedImage:
    """Per-image features, computed once and lifted as often as needed."""
    global_tokens: torch.Tensor        # [B, 1 + registers, D]: CLS then the register tokens
    patch_map: torch.Tensor            # [B, S/16, S/16, D] patch tokens, row-major (BHWC)
    hr_map: torch.Tensor | None        # [B, D, T, T] NAF-upsampled patch map (BCHW), None without NAF
    image_size: int                    # S, the side of the image the cameras refer to


class DinoV3ProjFeatureExtractor(torch.nn.Module):
    """DINOv3 ViT + optional NAF + back-projection (official `DinoV3ProjFeatureExtractor`).

    The DINOv3 backbone comes from `dinov3_config` (a `DINOv3ViTConfig` dict: randomly initialised, for tests
    and for loading a state_dict) or from a local transformers folder (`dinov3_path`, or `model_name` when it
    is a directory). Nothing is ever downloaded here. A loader that builds the four official extractors passes
    one shared backbone (`dinov3`) and NAF (`naf`) to all of them: one copy in memory, and `encode`'s cache
    then runs DINOv3 once per image size.
    """

    def __init__(self, model_name: str = "camenduru/dinov3-vitl16-pretrain-lvd1689m", image_size: int = 512,
                 grid_resolution: int = 16, use_naf_upsample: bool = False, naf_target_size: int = 512,
                 dinov3_config: dict | None = None, dinov3_path: str | None = None, naf_config: dict | None = None,
                 dinov3: DINOv3ViTModel | None = None, naf: NAF | None = None):
        super().__init__()
        del naf_config   # informational only (the NAF constructor is fixed: `NAF()` defaults)
        self.image_size = image_size
        self.grid_resolution = grid_resolution
        self.use_naf_upsample = use_naf_upsample
        self.naf_target_size = naf_target_size
        self.model = dinov3 if dinov3 is not None else self._build_dinov3(model_name, dinov3_config, dinov3_path)
        self._register_load_state_dict_pre_hook(self._official_layer_keys)
        self.naf_model = (naf if naf is not None else NAF()) if use_naf_upsample else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[:, None, None], persistent=False)

    @staticmethod
    def _build_dinov3(model_name: str, config: dict | None, path: str | None) -> DINOv3ViTModel:
        if config is not None:
            return DINOv3ViTModel(DINOv3ViTConfig(**config))
        path = path or model_name
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"DINOv3 weights not found at {path!r}: pass `dinov3_path` = a local transformers folder "
                "(config.json + model.safetensors); this backend never downloads models on its own")
        return DINOv3ViTModel.from_pretrained(path, local_files_only=True)

    CHECKPOINT_LAYER_KEYS = "model.layer."

    @property
    def dinov3_layers(self) -> torch.nn.ModuleList:
        """The transformer blocks: `model.layer` in transformers 4.x, `model.model.layer` in 5.x."""
        return self.model.layer if hasattr(self.model, "layer") else self.model.model.layer

    @property
    def layer_keys(self) -> str:
        """The state-dict prefix of the blocks in the installed transformers: `model.layer.` (4.x, the checkpoints'
        names) or `model.model.layer.` (5.x)."""
        return self.CHECKPOINT_LAYER_KEYS if hasattr(self.model, "layer") else "model.model.layer."

    def checkpoint_keys(self, state_dict: dict, prefix: str = "") -> None:
        """Checkpoints (official ones, fixtures, our default model) name the blocks `model.layer.*`
        (transformers 4.x); renames them in place onto the 5.x module tree when that is what is installed.
        `loading.load_state_dict_strict` calls it before comparing keys; `load_state_dict` through a hook."""
        old, new = prefix + self.CHECKPOINT_LAYER_KEYS, prefix + self.layer_keys
        if old == new:
            return
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[new + key[len(old):]] = state_dict.pop(key)

    def _official_layer_keys(self, state_dict, prefix, *args):
        self.checkpoint_keys(state_dict, prefix)

    # -----------------------------------------------------------------------------------------------------
    # encoding
    # -----------------------------------------------------------------------------------------------------

    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] float in [0, 1] (LANCZOS resize to S, then RGB)."""
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(im.resize(size, Image.Resampling.LANCZOS).convert("RGB"), dtype=np.float32) / 255
                  for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.mean.device)

    def dinov3_tokens(self, image01: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> [B, 1 + registers + (S/16)^2, D]: every layer, then a LayerNorm without
        parameters (the model's own final `norm` is not used by Pixal3D)."""
        pixels = ((image01 - self.mean) / self.std).to(self.model.embeddings.patch_embeddings.weight.dtype)
        hidden = self.model.embeddings(pixels, bool_masked_pos=None)
        position = self.model.rope_embeddings(pixels)
        for layer in self.dinov3_layers:
            hidden = layer(hidden, position_embeddings=position)
        return F.layer_norm(hidden, hidden.shape[-1:])

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], cache: dict | None = None) -> EncodedImage:
        """PIL images -> `EncodedImage`.

        `cache`, a dict kept for one generation, shares the DINOv3 tokens between extractors that use the same
        backbone module at the same image size (the four official extractors load identical DINOv3 weights, so
        a loader can give them one module: then the SS and shape-512 stages, and the shape-1024 and texture
        stages, run DINOv3 once per pair).
        """
        images = [images] if isinstance(images, Image.Image) else list(images)
        key = ("dinov3", id(self.model), self.image_size, tuple(id(im) for im in images))
        if cache is not None and key in cache:
            image01, tokens = cache[key]
        else:
            image01 = self.image_tensor(images)
            tokens = self.dinov3_tokens(image01)
            if cache is not None:
                cache[key] = (image01, tokens)
        num_global = 1 + self.model.config.num_register_tokens
        side = self.image_size // self.model.config.patch_size
        patch_map = tokens[:, num_global:].reshape(tokens.shape[0], side, side, tokens.shape[-1])
        hr_map = None
        if self.use_naf_upsample:
            # NAF is guided by the un-normalised image.
            target = (self.naf_target_size, self.naf_target_size)
            hr_map = self.naf_model(image01, patch_map.permute(0, 3, 1, 2), target)
        return EncodedImage(tokens[:, :num_global], patch_map, hr_map, self.image_size)

    # -----------------------------------------------------------------------------------------------------
    # lifting
    # -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _lift_maps(patch_map, hr_map, lift) -> torch.Tensor:
        """`lift(fmap, layout)` on the patch map and on the NAF map -> cat([lr, hr], -1) (lr first)."""
        lr = lift(patch_map, "BHWC")
        return lr if hr_map is None else torch.cat([lr, lift(hr_map, "BCHW")], -1)

    @torch.no_grad()
    def lift(self, encoded: EncodedImage, coords: torch.Tensor, grid_resolution: int, camera) -> torch.Tensor:
        """Features of the voxels `coords` [N, 3] (x, y, z) of an R^3 grid seen by `camera` (a `ViewCamera`)
        in the single encoded image -> [N, C], C = D without NAF, else 2D (`[lr, hr]`)."""
        if encoded.patch_map.shape[0] != 1:
            raise ValueError(f"lift takes one encoded image, got {encoded.patch_map.shape[0]}; "
                             "use lift_multiview for several views of one object")
        c2w = camera_to_world(camera)
        return self._lift_maps(
            encoded.patch_map, encoded.hr_map,
            lambda fmap, layout: lift_features(fmap, coords, grid_resolution, encoded.image_size, camera.fov,
                                               mesh_scale=camera.mesh_scale, c2w=c2w, layout=layout))[0]

    @torch.no_grad()
    def lift_multiview(self, encoded: EncodedImage, coords: torch.Tensor, grid_resolution: int,
                       cameras: Sequence, weighting: str = "mean") -> torch.Tensor:
        """One object seen in V views (`encoded` holds the V images as its batch; `cameras[v]` has its c2w
        re-based into the main view's frame): fused features of voxels `coords` [N, 3] -> [N, C]. See
        `proj_grid.lift_features_multiview` for `weighting`."""
        if len(cameras) != encoded.patch_map.shape[0]:
            raise ValueError(f"{len(cameras)} cameras for {encoded.patch_map.shape[0]} views")
        fovs = [c.fov for c in cameras]
        c2ws = np.stack([camera_to_world(c) for c in cameras])
        scales = [c.mesh_scale for c in cameras]
        return self._lift_maps(
            encoded.patch_map, encoded.hr_map,
            lambda fmap, layout: lift_features_multiview(fmap, coords, grid_resolution, encoded.image_size,
                                                         fovs, c2ws, scales, weighting, layout))

    def forward(self, images: Sequence[Image.Image], camera_angle_x, distance, mesh_scale=1.0,
                grid_resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Official dense call: -> (global [B, 1 + registers, D], proj [B, R^3, C]); camera arguments are
        scalars or per-image sequences/tensors (front view)."""
        encoded = self.encode(images)
        R = grid_resolution or self.grid_resolution
        coords = dense_grid_coords(R, encoded.patch_map.device)
        proj = self._lift_maps(
            encoded.patch_map, encoded.hr_map,
            lambda fmap, layout: lift_features(fmap, coords, R, encoded.image_size, camera_angle_x, distance,
                                               mesh_scale, layout=layout))
        return encoded.global_tokens, proj

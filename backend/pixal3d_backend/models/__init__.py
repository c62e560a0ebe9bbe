"""Model factory: builds any Pixal3D network from an official checkpoint config `{"name", "args"}`.

`build_model` is a stable entry point: the parity checker and other verification tools call it.
"""
from __future__ import annotations

import importlib

import torch

# official class name -> (module inside pixal3d_backend, class name here)
_REGISTRY: dict[str, tuple[str, str]] = {
    "SparseStructureFlowModel": ("pixal3d_backend.models.flow_dit", "SparseStructureFlowModel"),
    "SLatFlowModel": ("pixal3d_backend.models.flow_dit", "SLatFlowModel"),
    "ElasticSLatFlowModel": ("pixal3d_backend.models.flow_dit", "SLatFlowModel"),
    "SparseStructureDecoder": ("pixal3d_backend.models.ss_decoder", "SparseStructureDecoder"),
    "FlexiDualGridVaeDecoder": ("pixal3d_backend.models.sparse_vae", "FlexiDualGridVaeDecoder"),
    "SparseUnetVaeDecoder": ("pixal3d_backend.models.sparse_vae", "SparseUnetVaeDecoder"),
    "DinoV3ProjFeatureExtractor": ("pixal3d_backend.conditioning.image_encoder", "DinoV3ProjFeatureExtractor"),
    "NAF": ("pixal3d_backend.conditioning.naf", "NAF"),
    "ProjGrid": ("pixal3d_backend.conditioning.proj_grid", "ProjGrid"),
}


def model_class(name: str) -> type[torch.nn.Module]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown Pixal3D model class {name!r}; known: {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def build_model(config: dict) -> torch.nn.Module:
    """`config` is the content of an official `ckpts/<name>.json`: {"name": <class>, "args": {...}}."""
    if "name" not in config:
        raise KeyError("model config needs a 'name' (the official class name) and 'args'")
    return model_class(config["name"])(**(config.get("args") or {}))

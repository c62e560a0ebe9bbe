"""Loading Pixal3D checkpoints: official Hugging Face snapshots and our bundled default model.

A snapshot folder looks like the official `TencentARC/Pixal3D` repository:

    pipeline.json                      {"name": ..., "args": {"models": {<pipeline key>: "ckpts/<name>"}, samplers, normalisation, ...}}
    ckpts/<name>.json                  {"name": <official class>, "args": {...}}
    ckpts/<name>.safetensors           the state_dict with the official key names

Every checkpoint is loaded **strictly**: a missing or unexpected key, or a shape mismatch, is an error that names
the file and the keys. Our module attribute names are the official ones, so no key is renamed; the only
non-parameter tensor in the official files, the SS flow's `rope_phases` buffer, is a persistent buffer of our
model too and is loaded like any other tensor, as the official loader does.

Storage dtypes: the `*_bf16` flow checkpoints are stored in float32 and the decoders in float16; each tensor is cast
to the dtype of the parameter it fills, which our modules set at construction by the official rule (flows:
Linear weights inside `blocks` in bf16, everything else fp32; decoders with `use_fp16`: the conv/linear weights of
the blocks in fp16). This is what the official `convert_to_fp16/bf16` after loading produces.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .models import build_model

OFFICIAL_REPO_ID = "TencentARC/Pixal3D"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as-is; the message says which file and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Finding a snapshot
# ---------------------------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring HF_HUB_CACHE and HF_HOME like huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def resolve_snapshot(path_or_repo_id: str | os.PathLike, revision: str = "main") -> Path:
    """A local folder, or a repo id already present in the local HF cache. Never downloads."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        if not (p / "pipeline.json").is_file():
            raise CheckpointError(f"{p} has no pipeline.json: point at the root of a Pixal3D snapshot "
                                  f"(the folder that holds pipeline.json and ckpts/)")
        return p
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or p.exists():
        raise CheckpointError(f"{path_or_repo_id!r} is neither a snapshot folder nor a Hugging Face repo id")
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo_dir / "snapshots" / commit
    if not (snap / "pipeline.json").is_file():
        raise CheckpointError(
            f"{repo_id} (revision {revision}) is not in the local Hugging Face cache ({hf_cache_dir()}). "
            f"Download it once with `pixal3d weights download` or pass the path of a local snapshot.")
    return snap


# ---------------------------------------------------------------------------------------------------------
# Loading one checkpoint strictly
# ---------------------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_state_dict_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copies `tensors` into `model`, casting each to the dtype of its destination; fails on any key or shape
    difference with a message that lists the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {source} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:12]}"
                         f"{' ...' if len(unexpected) > 12 else ''}")
        for k in wrong_shape[:12]:
            lines.append(f"  shape of {k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}")
        lines.append("  The file and its .json config must come from the same checkpoint; re-download it if it "
                     "was modified.")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, dst in own.items():
            dst.copy_(tensors[k].to(dst.dtype) if not dst.is_complex() else tensors[k])


def load_checkpoint(config_path: Path, weights_path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Builds the model of `<name>.json` and loads `<name>.safetensors` into it strictly."""
    config = read_json(config_path)
    model = build_model(config)
    if not weights_path.is_file():
        raise CheckpointError(f"missing weights {weights_path} for {config_path.name}")
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    load_state_dict_strict(model, tensors, str(weights_path))
    return model.to(device).eval().requires_grad_(False)


@dataclass
class Snapshot:
    """A resolved snapshot: its folder, its pipeline.json args and where each model's files are."""
    root: Path
    pipeline_args: dict

    @staticmethod
    def open(path_or_repo_id: str | os.PathLike) -> "Snapshot":
        root = resolve_snapshot(path_or_repo_id)
        cfg = read_json(root / "pipeline.json")
        if "args" not in cfg or "models" not in cfg["args"]:
            raise CheckpointError(f"{root / 'pipeline.json'} has no args.models section")
        return Snapshot(root, cfg["args"])

    def checkpoint_files(self, key: str) -> tuple[Path, Path]:
        models = self.pipeline_args["models"]
        if key not in models:
            raise CheckpointError(f"{self.root / 'pipeline.json'} lists no model {key!r} (has {sorted(models)})")
        stem = self.root / models[key]
        return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")

    def load(self, key: str, device: str | torch.device = "cpu") -> torch.nn.Module:
        return load_checkpoint(*self.checkpoint_files(key), device=device)

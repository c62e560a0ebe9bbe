"""Loading Pixal3D checkpoints: official Hugging Face snapshots and our bundled default model.

A snapshot folder looks like the official `TencentARC/Pixal3D` repository:

    pipeline.json                      {"name": ..., "args": {"models": {<pipeline key>: "ckpts/<name>"}, samplers, normalisation, ...}}
    ckpts/<name>.json                  {"name": <official class>, "args": {...}}
    ckpts/<name>.safetensors           the state_dict with the official key names

Every checkpoint is loaded **strictly**: a missing or unexpected key, or a shape mismatch, is an error that names
the file and the keys. Our module attribute names are the official ones, so no key is renamed; the only
non-parameter tensor in the official files, the SS flow's `rope_phases` buffer (`pos_emb` in a structure flow with
absolute positions), is a persistent buffer of our model too and is loaded like any other tensor, as the official
loader does.

Storage dtypes: the `*_bf16` flow checkpoints are stored in float32 and the decoders in float16; each tensor is cast
to the dtype of the parameter it fills, which our modules set at construction by the official rule (flows:
Linear weights inside `blocks` in bf16, everything else fp32; decoders with `use_fp16`: the conv/linear weights of
the blocks in fp16). This is what the official `convert_to_fp16/bf16` after loading produces.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from .models import build_model

if TYPE_CHECKING:
    from .pipeline import Pixal3DPipeline

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


def cached_repo(repo_id: str, revision: str = "main") -> Path | None:
    """The folder of a repo already in the local Hugging Face cache, or None. Never downloads."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo_dir / "snapshots" / commit
    return snap if snap.is_dir() else None


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
    snap = cached_repo(repo_id, revision)
    if snap is None or not (snap / "pipeline.json").is_file():
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
    difference with a message that lists the keys. A submodule with a `checkpoint_keys(tensors, prefix)` method
    first renames what a library version moved (DINOv3's blocks in transformers 5)."""
    tensors = dict(tensors)
    for name, module in model.named_modules():
        if hasattr(module, "checkpoint_keys"):
            module.checkpoint_keys(tensors, f"{name}." if name else "")
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


@contextlib.contextmanager
def initialisation_skipped():
    """`torch.nn.init`'s functions do nothing inside this block. Random initialisation is wasted work for a model
    whose every parameter and persistent buffer the strict load then overwrites (it would fail otherwise), and it
    is most of the build time of a large model on a CPU."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_checkpoint(config_path: Path, weights_path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Builds the model of `<name>.json` (without a random initialisation) and loads `<name>.safetensors` into it
    strictly."""
    config = read_json(config_path)
    with initialisation_skipped():
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

    def multiview_files(self, key: str) -> tuple[Path, Path] | None:
        """The official multi-view fine-tune of a flow, `<checkpoint>_mv.json/.safetensors` next to the single-view
        one (spec §3.2: same configs and tensor names), or None when the snapshot has none."""
        files = tuple(p.with_name(f"{p.stem}_mv{p.suffix}") for p in self.checkpoint_files(key))
        return files if all(p.is_file() for p in files) else None


# ---------------------------------------------------------------------------------------------------------
# A whole model: the pipeline with its conditioning, from a snapshot
# ---------------------------------------------------------------------------------------------------------

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


@dataclass
class LoadedModel:
    pipeline: "Pixal3DPipeline"
    model_id: str
    model_hash: str
    default_options: dict          # protocol `Options` fields suited to this model (its resolution, face budget)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self.pipeline.resolutions


def fingerprint(snapshot: Snapshot, keys: list[str], multiview: dict | None = None) -> str:
    """A cheap identity of a snapshot's weights: sha256 over pipeline.json, each checkpoint's config, its
    safetensors header (names, shapes, dtypes, offsets) and its first and last MiB (multi-view fine-tunes, when
    loaded, after the others). Hashing 24 GB of weights at every start would take minutes; this catches any
    re-export, truncation or different checkpoint."""
    import hashlib

    h = hashlib.sha256((snapshot.root / "pipeline.json").read_bytes())
    files = [snapshot.checkpoint_files(key) for key in sorted(keys)]
    files += [snapshot.multiview_files(key) for key in sorted(multiview or {})]
    for config, weights in files:
        h.update(config.read_bytes())
        with open(weights, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 24)))
            h.update(f.read(1 << 20))
            f.seek(max(0, weights.stat().st_size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()[:16]


def multiview_flows(snapshot: Snapshot, flow_keys: list[str], device) -> dict[str, torch.nn.Module]:
    """The multi-view fine-tunes of the flows `flow_keys`, loaded strictly when the snapshot has all of them;
    {} when it has none. Some but not all is an error: a half multi-view cascade is not what anyone trained."""
    found = {k: snapshot.multiview_files(k) for k in flow_keys}
    present = {k: files for k, files in found.items() if files is not None}
    if present and len(present) != len(found):
        missing = [f"{snapshot.checkpoint_files(k)[1].stem}_mv" for k in found if k not in present]
        raise CheckpointError(f"{snapshot.root / 'ckpts'} has some multi-view checkpoints but not {missing}; "
                              "download the complete multi-view release or remove the partial one")
    return {k: load_checkpoint(*files, device=device) for k, files in present.items()}


def find_dinov3(path: str | os.PathLike | None) -> Path:
    """The local DINOv3 ViT-L/16 folder: an explicit path, $PIXAL3D_DINOV3, or the Hugging Face cache."""
    from .weights import DINOV3_REPO_ID

    candidate = path or os.environ.get("PIXAL3D_DINOV3") or cached_repo(DINOV3_REPO_ID)
    if candidate is None or not (Path(candidate) / "config.json").is_file():
        raise CheckpointError(
            "the official Pixal3D model needs DINOv3 ViT-L/16 weights: pass --dinov3 <folder with config.json and "
            f"model.safetensors>, set PIXAL3D_DINOV3, or run `pixal3d weights download` (got {candidate})")
    return Path(candidate)


def load_naf(path: str | os.PathLike | None, device) -> torch.nn.Module:
    """NAF from `naf_release.pth` (explicit path, $PIXAL3D_NAF or the torch hub cache), loaded strictly: every
    parameter must be in the file; the deterministic RoPE buffer may be absent (it is recomputed)."""
    from .conditioning.naf import NAF
    from .weights import naf_weights_path

    file = Path(path or os.environ.get("PIXAL3D_NAF") or naf_weights_path())
    if not file.is_file():
        raise CheckpointError(f"NAF weights not found at {file}: pass --naf <naf_release.pth>, set PIXAL3D_NAF, or "
                              "run `pixal3d weights download`")
    state = torch.load(file, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):          # release files sometimes wrap the state_dict
        if isinstance(state, dict) and set(state) == {wrapper}:
            state = state[wrapper]
    naf = NAF()
    params = dict(naf.named_parameters())
    buffers = {k: v for k, v in naf.state_dict().items() if k not in params}
    load_state_dict_strict(naf, {**buffers, **state}, str(file))
    return naf.to(device).eval().requires_grad_(False)


def official_encoders(dinov3_path, naf_path, device, stages: dict | None = None) -> dict:
    """The four extractors of the official scripts (`official.ENCODER_STAGES` unless `stages` says otherwise),
    sharing one DINOv3 and one NAF."""
    from transformers import DINOv3ViTModel

    from .conditioning.image_encoder import DinoV3ProjFeatureExtractor
    from .official import ENCODER_STAGES

    backbone = DINOv3ViTModel.from_pretrained(str(find_dinov3(dinov3_path)), local_files_only=True)
    backbone = backbone.to(device).eval().requires_grad_(False)
    naf = load_naf(naf_path, device)
    return {key: DinoV3ProjFeatureExtractor(dinov3=backbone, naf=naf, **stage).eval()
            for key, stage in (stages or ENCODER_STAGES).items()}


def load_model(model: str | os.PathLike | None = None, device: str | torch.device = "cpu", low_vram: bool = False,
               dinov3_path: str | os.PathLike | None = None, naf_path: str | os.PathLike | None = None,
               encoder_stages: dict | None = None) -> LoadedModel:
    """The pipeline of a snapshot: ours (default: the bundled model) or the official one with its helpers."""
    from .pipeline import FLOW_KEYS, SAMPLER_KEYS, SINGLE_STAGE_KEYS, TWO_STAGE_KEYS, Normalization, Pixal3DPipeline
    from .sampler import STAGE_DEFAULTS

    if model is None:
        if not (DEFAULT_MODEL_DIR / "pipeline.json").is_file():
            raise CheckpointError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; reinstall the "
                                  "backend or pass --model <snapshot>")
        model = DEFAULT_MODEL_DIR
    snapshot = Snapshot.open(model)
    args = snapshot.pipeline_args
    listed = args["models"]
    keys = [k for k in (TWO_STAGE_KEYS if "shape_slat_flow_model_1024" in listed else SINGLE_STAGE_KEYS)
            if k in listed]
    stage_device = "cpu" if low_vram else device
    multiview = multiview_flows(snapshot, [k for k in keys if k in FLOW_KEYS], stage_device)
    modules = {k: snapshot.load(k, stage_device) for k in keys}
    encoders = {k: modules.pop(k) for k in list(modules) if k.startswith("image_cond_model")}
    if not encoders:                                  # official snapshots: the scripts build the extractors
        encoders = official_encoders(dinov3_path, naf_path, stage_device, encoder_stages)
    settings = {stage: {**STAGE_DEFAULTS[stage], **args.get(key, {}).get("params", {})}
                for stage, key in SAMPLER_KEYS.items()}
    sigma_min = args.get("sparse_structure_sampler", {}).get("args", {}).get("sigma_min", 1e-5)
    pipeline = Pixal3DPipeline(modules, encoders, settings,
                               Normalization.from_json(args["shape_slat_normalization"]),
                               Normalization.from_json(args["tex_slat_normalization"]),
                               sigma_min=sigma_min, device=device, low_vram=low_vram, multiview_models=multiview)
    model_id = "default" if snapshot.root == DEFAULT_MODEL_DIR else str(model)
    defaults = dict(args.get("default_options", {}))
    defaults.setdefault("resolution", pipeline.resolutions[0])
    return LoadedModel(pipeline, model_id, fingerprint(snapshot, keys, multiview), defaults)

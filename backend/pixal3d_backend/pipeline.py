"""The Pixal3D cascade: one RGBA image (or several posed views) -> decoded mesh + PBR voxel attributes.

Stages (spec §1.2), each a method so it can be run, timed and tested on its own:

    sparse structure   SS flow on a dense 16^3 latent -> SS decoder -> occupied 32^3 coords
    shape LR           shape flow 512 on the 32^3 tokens -> de-normalised LR shape latent
    upsample           shape decoder's subdivision x4 -> 512^3 coords -> HR grid G (token cap)
    shape HR           shape flow 1024 on the G^3 tokens -> de-normalised shape latent
    texture            texture flow on [noise | normalised shape latent] -> de-normalised texture latent
    decode             shape decoder -> flexible-dual-grid mesh; texture decoder -> PBR voxel attributes

Every flow is conditioned on image features lifted into its own voxel grid (pixel-aligned conditioning).
Features are lifted only at the active voxels, never into a dense G^3 buffer.

Numerics follow the official code exactly (parity fixture `pipeline_e2e`): the noise of the four sampled stages is
drawn in order from a CPU generator seeded with `seed`, then moved to the device.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .conditioning.image_encoder import DinoV3ProjFeatureExtractor
from .conditioning.preprocess import object_crop, on_black
from .conditioning.proj_grid import camera_to_world, lift_features_multiview
from .camera import ViewCamera
from .mesh import VoxelMesh
from .models.ss_decoder import occupancy_to_coords
from .sampler import FlowEulerGuidanceIntervalSampler
from .sparse import SparseTensor

# The official two-stage cascade (1024 / 1536) and the single-stage one of TRELLIS.2's 512 pipeline, which our
# small default model uses: texture straight on the 32^3 tokens, decoded at 32 * 2^(decoder upsamplings).
TWO_STAGE_KEYS = ("sparse_structure_flow_model", "sparse_structure_decoder", "shape_slat_flow_model_512",
                  "shape_slat_flow_model_1024", "tex_slat_flow_model_1024", "shape_slat_decoder", "tex_slat_decoder",
                  "image_cond_model_ss", "image_cond_model_shape_512", "image_cond_model_shape_1024",
                  "image_cond_model_tex_1024")
SINGLE_STAGE_KEYS = ("sparse_structure_flow_model", "sparse_structure_decoder", "shape_slat_flow_model_512",
                     "tex_slat_flow_model_512", "shape_slat_decoder", "tex_slat_decoder",
                     "image_cond_model_ss", "image_cond_model_shape_512", "image_cond_model_tex_512")
ENCODER_KEYS = tuple(k for k in TWO_STAGE_KEYS + SINGLE_STAGE_KEYS if k.startswith("image_cond_model"))
FLOW_KEYS = tuple(k for k in dict.fromkeys(TWO_STAGE_KEYS + SINGLE_STAGE_KEYS) if "flow_model" in k)
SAMPLER_KEYS = {"sparse_structure": "sparse_structure_sampler", "shape": "shape_slat_sampler",
                "texture": "tex_slat_sampler"}

SS_RESOLUTION = 32          # occupancy grid of the sparse structure (hard-coded for both cascades, §1.2)
LR_GRID = 512               # resolution of the coords after the decoder's x4 upsampling of the 32^3 LR latent
MAX_NUM_TOKENS = 49152      # official token cap of the HR stage
TWO_STAGE_RESOLUTIONS = (1024, 1536)
# How several views condition the cascade: "mean" / "visible" fuse their lifted features per voxel (the official
# multi-view release, for weights fine-tuned on it); "hull" conditions every stage on view 0 alone, as single-view
# weights were trained, removes the sparse-structure tokens outside any view's silhouette and adds the surface
# tokens of the views' visual hull (with the exact cameras).
FUSIONS = ("mean", "visible", "hull")
HULL_MASK_SIZE = 256            # silhouettes are resampled to this side before carving


@dataclass
class Normalization:
    mean: torch.Tensor
    std: torch.Tensor

    @staticmethod
    def from_json(d: dict) -> "Normalization":
        return Normalization(torch.tensor(d["mean"], dtype=torch.float32), torch.tensor(d["std"], dtype=torch.float32))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)


@dataclass
class RunContext:
    """What the stages of one generation share: the conditioning views (preprocessed images and their cameras,
    view 0 the main view), how several views' features are fused, the noise generator (all noise is drawn from it
    in the official order, whatever the number of views), the sampler overrides, the callbacks, the image features
    computed so far (DINOv3 tokens are reused across stages at the same image size) and the trace of intermediates
    (parity tests)."""
    images: list[Image.Image]
    cameras: list[ViewCamera]
    generator: torch.Generator
    overrides: dict = field(default_factory=dict)
    progress: Callable[[str, int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    trace: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    fusion: str = "mean"
    silhouettes: torch.Tensor | None = None     # [V, 1, S, S] crop alphas in [0, 1], for "hull"


@dataclass
class PipelineOutput:
    mesh: VoxelMesh                      # model frame, before hole filling (the exporter fills holes)
    shape_slat: SparseTensor
    tex_slat: SparseTensor
    resolution: int                      # 16 * G, the decoded voxel resolution
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def inside_every_view(coords: torch.Tensor, silhouettes: torch.Tensor, cameras: Sequence[ViewCamera]
                      ) -> torch.Tensor:
    """Bool [N]: whether each sparse-structure token's centre (`coords` [N, 4] on the 32^3 grid) projects inside
    every view's silhouette (`silhouettes` [V, 1, S, S] crop alphas, `cameras` re-based onto view 0)."""
    size = silhouettes.shape[-1]
    c2ws = np.stack([camera_to_world(c) for c in cameras])
    inside = torch.ones(coords.shape[0], dtype=torch.bool, device=coords.device)
    for v, cam in enumerate(cameras):
        seen = lift_features_multiview(silhouettes[v:v + 1], coords[:, 1:], SS_RESOLUTION, size, [cam.fov],
                                       c2ws[v:v + 1], [cam.mesh_scale])
        inside &= seen[:, 0].to(coords.device) > 0.5
    return inside


def carve_visual_hull(coords: torch.Tensor, silhouettes: torch.Tensor, cameras: Sequence[ViewCamera]
                      ) -> torch.Tensor:
    """Sparse-structure tokens `coords` [N, 4] kept when their centre falls inside every view's silhouette, each
    dilated by a token's width in the crop (a token spans about 1/32 of it at mid-depth) so carving never cuts into
    the object. If nothing would be left (cameras that disagree), the tokens are kept as they were."""
    radius = max(1, round(silhouettes.shape[-1] / SS_RESOLUTION))
    dilated = torch.nn.functional.max_pool2d(silhouettes, 2 * radius + 1, stride=1, padding=radius)
    inside = inside_every_view(coords, dilated, cameras)
    return coords[inside] if inside.any() else coords


def visual_hull_shell(silhouettes: torch.Tensor, cameras: Sequence[ViewCamera]) -> torch.Tensor:
    """The tokens [M, 4] of the views' visual hull that have a 6-neighbour outside it: the sparse structure a solid
    filling the hull would have. Where the single-view model guessed a part's depth wrong, carving removed it; the
    shell puts tokens where every view says the object is."""
    r = SS_RESOLUTION
    coords = grid_coords(r, silhouettes.device)
    solid = torch.nn.functional.pad(inside_every_view(coords, silhouettes, cameras).view(r, r, r), (1,) * 6)
    interior = solid[1:-1, 1:-1, 1:-1].clone()
    for axis in range(3):
        for shift in (0, 2):
            interior &= solid.narrow(axis, shift, r).narrow((axis + 1) % 3, 1, r).narrow((axis + 2) % 3, 1, r)
    shell = solid[1:-1, 1:-1, 1:-1] & ~interior
    return coords[shell.reshape(-1)]


def grid_coords(r: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every cell of an r^3 grid as sparse coords [r^3, 4] int32 (batch 0), in the dense order ix*r*r + iy*r + iz."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(r, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.zeros(r ** 3, 1, dtype=torch.int32, device=device), grid.int()], 1)


def _weights(module: torch.nn.Module):
    """The parameters and buffers of a module (what moves between host and device)."""
    yield from module.parameters()
    yield from module.buffers()


def coords_grid(resolution: int) -> int:
    """Latent grid of the HR stage at a decoded resolution (16x upsampling in the official decoders)."""
    return resolution // 16


def hr_grid_coords(upsampled: torch.Tensor, resolution: int, max_num_tokens: int = MAX_NUM_TOKENS
                   ) -> tuple[torch.Tensor, int]:
    """Quantises the decoder's 512^3 coords to the HR latent grid G = res // 16 with the official rule
    `round((c + 0.5) / 512 * (G - 1))` + unique; if there are too many tokens the resolution drops by 128 until
    it fits or reaches 1024 (spec §1.6). Returns (coords [N_hr, 4] int32, resolution)."""
    res = resolution
    while True:
        g = coords_grid(res)
        xyz = ((upsampled[:, 1:].float() + 0.5) / LR_GRID * (g - 1)).round().int()
        coords = torch.cat([upsampled[:, :1].int(), xyz], 1).unique(dim=0)
        if coords.shape[0] < max_num_tokens or res == 1024:
            return coords, res
        res -= 128


class Pixal3DPipeline:
    def __init__(self, models: dict[str, torch.nn.Module], encoders: dict[str, DinoV3ProjFeatureExtractor],
                 sampler_settings: dict[str, dict], shape_norm: Normalization, tex_norm: Normalization,
                 sigma_min: float = 1e-5, device: str | torch.device = "cpu", low_vram: bool = False,
                 multiview_models: dict[str, torch.nn.Module] | None = None):
        self.two_stage = "shape_slat_flow_model_1024" in models
        available = set(models) | set(encoders)
        missing = [k for k in (TWO_STAGE_KEYS if self.two_stage else SINGLE_STAGE_KEYS) if k not in available]
        if missing:
            raise ValueError(f"pipeline is missing models: {missing}")
        self.models = models
        # The official multi-view fine-tunes of the flows (`*_mv`, same architecture), used for several views.
        self.multiview_models = multiview_models or {}
        unknown = sorted(set(self.multiview_models) - set(FLOW_KEYS))
        if unknown:
            raise ValueError(f"multi-view models must be flows ({FLOW_KEYS}), got {unknown}")
        self.encoders = encoders
        self.sampler = FlowEulerGuidanceIntervalSampler(sigma_min=sigma_min)
        self.sampler_settings = sampler_settings        # {"sparse_structure"|"shape"|"texture": params}
        self.shape_norm = shape_norm
        self.tex_norm = tex_norm
        self.device = torch.device(device)
        # CFG's two passes as one forward of a doubled batch (the official code runs two forwards; same numbers).
        self.batch_cfg = True
        self.low_vram = False
        if low_vram:
            self.enable_low_vram()
        else:
            for m in self._modules():
                m.to(self.device)

    @property
    def multiview_weights(self) -> bool:
        """Whether every flow of this cascade has its multi-view fine-tune loaded."""
        return all(k in self.multiview_models for k in self.models if k in FLOW_KEYS)

    def _flow(self, key: str, run: "RunContext") -> torch.nn.Module:
        """The flow of a stage: its multi-view fine-tune for several views when one is loaded."""
        if len(run.cameras) > 1 and key in self.multiview_models:
            return self.multiview_models[key]
        return self.models[key]

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Decoded resolutions this pipeline offers: the official cascades, or the single-stage decoder's own."""
        if self.two_stage:
            return TWO_STAGE_RESOLUTIONS
        return (SS_RESOLUTION * 2 ** self.models["shape_slat_decoder"].num_upsamplings,)

    # -- device placement ---------------------------------------------------------------------------------
    def _modules(self) -> list[torch.nn.Module]:
        return [*self.models.values(), *self.multiview_models.values(), *self.encoders.values()]

    def enable_low_vram(self) -> None:
        """From now on every model lives in host memory and visits the device only for its own stage. On a GPU the
        host copies are pinned, so a stage's weights cross the bus in one DMA at full speed, and nothing is copied
        back afterwards (weights never change): the device copy is simply dropped."""
        self.low_vram = True
        pin = self.device.type == "cuda"
        for m in self._modules():
            m.to("cpu")
            for t in _weights(m):
                if pin and not t.is_pinned():
                    t.data = t.data.pin_memory()
        if pin:
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _on_device(self, *modules: torch.nn.Module):
        """In low-VRAM mode, the weights of `modules` are on the device inside this block and in host memory after."""
        if not self.low_vram or self.device.type == "cpu":
            yield
            return
        visiting = []                    # (tensor, its host copy); shared submodules are moved once
        for m in modules:
            for t in _weights(m):
                if t.device.type == "cpu":
                    visiting.append((t, t.data))
                    t.data = t.data.to(self.device, non_blocking=True)
        try:
            yield
        finally:
            for t, host in visiting:
                t.data = host
            torch.cuda.empty_cache()

    # -- conditioning and sampling -------------------------------------------------------------------
    def _condition(self, key: str, run: "RunContext", coords: torch.Tensor, grid_resolution: int
                   ) -> tuple[dict, dict]:
        """Conditions of one stage at the given voxel coords: (cond, neg_cond); the negative condition is zeros for
        both the global tokens and the lifted features (official CFG).

        Several views (official multi-view, spec §3.2) are encoded as one batch; their lifted features are fused per
        voxel (`run.fusion`: the plain mean, or the mean over the views that see the voxel) and their global tokens
        averaged. One view, and "hull" fusion (view 0 conditions, the others only carve), take the single-view path
        unchanged."""
        enc = self.encoders[key]
        single = len(run.cameras) == 1 or run.fusion == "hull"
        with self._on_device(enc):
            encoded = enc.encode(run.images[:1] if single else run.images, run.features)
            if single:
                lifted = enc.lift(encoded, coords[:, 1:], grid_resolution, run.cameras[0])
                glob = encoded.global_tokens
            else:
                lifted = enc.lift_multiview(encoded, coords[:, 1:], grid_resolution, run.cameras, run.fusion)
                glob = encoded.global_tokens.mean(0, keepdim=True)
        cond = {"global": glob, "proj": lifted}
        neg = {"global": torch.zeros_like(glob), "proj": torch.zeros_like(lifted)}
        return cond, neg

    def _sample(self, stage: str, model: torch.nn.Module, noise, cond, neg, run: "RunContext", **kwargs):
        params = {**self.sampler_settings[stage], **run.overrides.get(stage, {})}
        progress = run.progress
        with self._on_device(model):
            return self.sampler.sample(
                model, noise, cond=cond, neg_cond=neg, **params, **kwargs,
                on_step=(lambda i, n: progress(stage, i, n)) if progress else None,
                should_cancel=run.should_cancel, batch_cfg=self.batch_cfg).samples

    def _sample_tokens(self, tag: str, stage: str, flow_key: str, encoder_key: str, run: "RunContext",
                       coords: torch.Tensor, grid: int, concat: SparseTensor | None = None) -> SparseTensor:
        """One sparse stage: noise on the tokens `coords` (drawn now, from the run's CPU generator), conditions lifted
        at those tokens on the `grid`^3 latent grid, the flow sampled. Returns the normalised latent; the
        intermediates go to the run's trace under `tag` (the parity fixture's names)."""
        flow = self._flow(flow_key, run)
        cond, neg = self._condition(encoder_key, run, coords, grid)
        feats = torch.randn(coords.shape[0], flow.out_channels, generator=run.generator).to(self.device)
        noise = concat.replace(feats) if concat is not None else SparseTensor(feats, coords)  # share the coords cache
        cond["proj"], neg["proj"] = noise.replace(cond["proj"]), noise.replace(neg["proj"])
        z = self._sample(stage, flow, noise, cond, neg, run, **({"concat_cond": concat} if concat is not None else {}))
        run.trace.update({f"{tag}_coords": coords, f"{tag}_noise": noise.feats, f"{tag}_samples": z.feats,
                          f"cond_{tag}_global": cond["global"], f"cond_{tag}_proj": cond["proj"].feats})
        return z

    # -- stages -----------------------------------------------------------------------------------------
    def sample_sparse_structure(self, run: "RunContext") -> torch.Tensor:
        """Dense SS flow on the r^3 latent (tokens in order ix*r*r+iy*r+iz) -> occupied 32^3 coords [N, 4]."""
        flow = self._flow("sparse_structure_flow_model", run)
        r = flow.resolution
        coords = grid_coords(r, self.device)
        cond, neg = self._condition("image_cond_model_ss", run, coords, r)
        cond["proj"], neg["proj"] = cond["proj"][None], neg["proj"][None]
        noise = torch.randn(1, flow.in_channels, r, r, r, generator=run.generator).to(self.device)
        z = self._sample("sparse_structure", flow, noise, cond, neg, run)
        decoder = self.models["sparse_structure_decoder"]
        with self._on_device(decoder):
            coords = occupancy_to_coords(decoder(z), SS_RESOLUTION)
        run.trace.update(ss_noise=noise, ss_samples=z, cond_ss_global=cond["global"], cond_ss_proj=cond["proj"])
        if run.silhouettes is not None:
            silhouettes = run.silhouettes.to(self.device)
            carved = carve_visual_hull(coords, silhouettes, run.cameras)
            coords = torch.cat([carved, visual_hull_shell(silhouettes, run.cameras)]).unique(dim=0)
        return coords

    def sample_shape_lr(self, run: "RunContext", coords: torch.Tensor) -> SparseTensor:
        z = self._sample_tokens("shape_lr", "shape", "shape_slat_flow_model_512", "image_cond_model_shape_512", run,
                                coords, SS_RESOLUTION)
        return z.replace(self.shape_norm.denormalize(z.feats))

    def upsample_to_hr(self, run: "RunContext", slat_lr: SparseTensor, resolution: int,
                       max_num_tokens: int) -> tuple[torch.Tensor, int]:
        decoder = self.models["shape_slat_decoder"]
        with self._on_device(decoder):
            upsampled = decoder.upsample(slat_lr, upsample_times=4)
        run.trace.update(lr_upsample_coords=upsampled)
        return hr_grid_coords(upsampled, resolution, max_num_tokens)

    def sample_shape_hr(self, run: "RunContext", coords: torch.Tensor, resolution: int) -> SparseTensor:
        z = self._sample_tokens("shape_hr", "shape", "shape_slat_flow_model_1024", "image_cond_model_shape_1024", run,
                                coords, coords_grid(resolution))
        return z.replace(self.shape_norm.denormalize(z.feats))

    def sample_texture(self, run: "RunContext", shape_slat: SparseTensor, grid: int) -> SparseTensor:
        """Texture latent on the shape latent's tokens (on a `grid`^3 latent grid), conditioned by concatenation on
        the normalised shape latent."""
        suffix = "1024" if self.two_stage else "512"
        concat = shape_slat.replace(self.shape_norm.normalize(shape_slat.feats))
        z = self._sample_tokens("tex", "texture", f"tex_slat_flow_model_{suffix}", f"image_cond_model_tex_{suffix}",
                                run, shape_slat.coords, grid, concat=concat)
        return z.replace(self.tex_norm.denormalize(z.feats))

    def decode(self, shape_slat, tex_slat, res, guide_subs=None) -> VoxelMesh:
        """Shape and texture decoders; `guide_subs` forces the voxel hierarchy (benchmarks use an object's own)."""
        shape_dec, tex_dec = self.models["shape_slat_decoder"], self.models["tex_slat_decoder"]
        with self._on_device(shape_dec):
            shape_dec.set_resolution(res)
            (mesh,), subs = shape_dec(shape_slat, guide_subs=guide_subs, return_subs=True)
        with self._on_device(tex_dec):
            mesh.attrs = tex_dec(tex_slat, guide_subs=subs).feats * 0.5 + 0.5   # same voxels, same order
        return mesh

    # -- the whole cascade ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, images: Image.Image | Sequence[Image.Image], cameras: ViewCamera | Sequence[ViewCamera],
            seed: int = 42, resolution: int = 1024, max_num_tokens: int = MAX_NUM_TOKENS,
            sampler_overrides: dict | None = None, preprocess: bool = True, fusion: str = "mean",
            progress: Callable[[str, int, int], None] | None = None, should_cancel: Callable[[], bool] | None = None,
            trace: dict | None = None) -> PipelineOutput:
        """`images` are RGBA with the object's alpha, one per camera (view 0 first; several views condition every
        stage together, fused by `fusion`: "mean" or "visible", see `proj_grid.lift_features_multiview`, or
        "hull": view 0's conditioning and the views' visual hull, see `FUSIONS`). With
        `preprocess` each is cropped as the official code does (the caller derives the cameras from the crops:
        `conditioning.preprocess.crop_geometry`, `camera.CropCamera` and, for several views, `camera.MultiViewRig`).
        The flows are the multi-view ones (`multiview_models`) when there are several views and they are loaded."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        cameras = [cameras] if isinstance(cameras, ViewCamera) else list(cameras)
        if len(images) != len(cameras) or not images:
            raise ValueError(f"{len(images)} images for {len(cameras)} cameras")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if resolution not in self.resolutions:
            raise ValueError(f"resolution must be one of {self.resolutions} for this model, got {resolution}")
        overrides = sampler_overrides or {}
        unknown = set(overrides) - set(self.sampler_settings)
        if unknown:
            raise ValueError(f"unknown sampler stages {sorted(unknown)}; stages are {sorted(self.sampler_settings)}")
        trace = {} if trace is None else trace
        silhouettes = None
        if fusion == "hull" and len(images) > 1 and not preprocess:
            raise ValueError("fusion 'hull' needs the RGBA views (preprocess=True) for their silhouettes")
        if preprocess:
            crops = [object_crop(image) for image in images]
            if fusion == "hull" and len(images) > 1:
                size = (HULL_MASK_SIZE, HULL_MASK_SIZE)
                silhouettes = torch.stack([torch.from_numpy(np.asarray(
                    crop.getchannel("A").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255)
                    for crop in crops])[:, None]
            images = [on_black(crop) for crop in crops]
        run = RunContext(images, cameras, torch.Generator().manual_seed(int(seed)), overrides, progress,
                         should_cancel, trace, fusion=fusion, silhouettes=silhouettes)
        timings: dict[str, float] = {}

        def timed(name, fn, *args):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            out = fn(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            timings[name] = time.perf_counter() - t0
            return out

        coords32 = timed("sparse_structure", self.sample_sparse_structure, run)
        slat_lr = timed("shape_lr", self.sample_shape_lr, run, coords32)
        if self.two_stage:
            coords_hr, res = timed("upsample", self.upsample_to_hr, run, slat_lr, resolution, max_num_tokens)
            shape_slat = timed("shape_hr", self.sample_shape_hr, run, coords_hr, res)
            grid = coords_grid(res)
        else:
            shape_slat, res, grid = slat_lr, resolution, SS_RESOLUTION
        tex_slat = timed("texture", self.sample_texture, run, shape_slat, grid)
        if progress:
            progress("decode", 0, 1)
        mesh = timed("decode", self.decode, shape_slat, tex_slat, res)
        tokens = {"ss": int(coords32.shape[0]), "shape": int(shape_slat.coords.shape[0]),
                  "voxels": int(mesh.coords.shape[0])}
        return PipelineOutput(mesh=mesh, shape_slat=shape_slat, tex_slat=tex_slat, resolution=res,
                              timings=timings, tokens=tokens)

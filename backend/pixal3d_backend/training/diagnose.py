"""Where the default model loses quality: `pixal3d eval`'s metrics on assets built from each stage's ceiling.

    python -m pixal3d_backend.training.diagnose --objects 3 --out DIR [--vae RUN] [--rows exact targets vae model]

Each row is an asset of the same held-out eval objects (`data.seed_of("eval", i)`), measured by
`evaluation.evaluate_object` exactly as `pixal3d eval` measures a generation (same conditioning render, same
metrics). Every row but `exact` goes through the product's export (`export.export_asset`, the model's default
options with the eval overrides) and placement (the service's crop-camera rig, `Generator.rig`):

  exact     the data engine's flexible-dual-grid voxels and PBR attributes of the eval render's own view, meshed
            by the product's mesher, exported, and placed exactly (no crop camera): representation + export
  targets   the same targets in the crop view that training uses (`data.views.crop_view`), placed by the rig:
            + the training/inference camera relation (what a perfect model could reach)
  vae_voxels  the crop-view targets through the VAE encoders (posterior means) and the shipped decoders on the
            true voxels (the decoders follow the targets' voxel hierarchy): what the decoders' outputs lose
  vae       the crop-view targets through the VAE encoders (posterior means) and the shipped decoders, decoded as
            the pipeline decodes (the shape decoder predicts its own subdivisions, the texture decoder follows)
  gt_shape  the shipped pipeline with the sparse structure and the shape latent replaced by the VAE encoder's
            (true tokens, posterior mean): what the texture flow alone loses
  gt_ss     the shipped pipeline with the sparse structure replaced by the true 32^3 tokens: shape + texture flows
  model     the shipped pipeline end to end (what `pixal3d eval` runs)

Also, per object, the sparse structure alone (input-view mask IoU of the 32^3 token cubes against the true
tokens' cubes, and 3-D token IoU) for the SS VAE and the SS flow, and a colour check: masked PSNR of each row's
albedo render after channel permutations and sRGB/linear transfers (a colour-space or channel-order mismatch
shows up as a transform that scores far better than the identity), and the mean colour over the common mask.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..camera import R_MODEL_TO_GLB
from ..data import PosedObject, ProceduralDataset, make_object, seed_of, shape_targets, surface_samples
from ..data.targets import ShapeTargets
from ..data.views import View, crop_view
from ..evaluation import (EvalOptions, evaluate_object, intrinsics_of, mask_iou, masked_psnr,
                          render_ground_truth)
from ..export import ExportOptions, export_asset
from ..loading import LoadedModel, load_model
from ..mesh import VoxelMesh, flexible_dual_grid_to_mesh, orient_outward
from ..models.ss_decoder import occupancy_to_coords
from ..render_mesh import render_albedo
from ..service import Generation, Generator
from ..sparse import SparseTensor
from . import configs
from .batches import Views, occupancy, shape_inputs, texture_inputs
from .stages import trained_keys
from .train import load_networks
from .voxels import coarsen, lookup, subdivision_guides

ROWS = ("exact", "targets", "vae_voxels", "vae", "gt_shape", "gt_ss", "model")
PIPELINE_ROWS = ("gt_shape", "gt_ss", "model")
METRICS = ("iou", "psnr", "ssim", "f@0.05_visible", "f@0.05_full", "chamfer_visible", "chamfer_full", "depth_scale")
DEFAULT_VAE_RUN = Path(__file__).resolve().parents[3] / ".device_carry" / "run"
# `pixal3d eval` as MODEL_CARD.md ran it
EVAL_GENERATION = {"face_target": 100_000, "texture_size": 1024}


@dataclasses.dataclass
class EvalObject:
    """One eval object as `evaluate_object` poses it, plus its crop-view targets at the decoder resolution."""
    seed: int
    field: object
    main: View
    crop: View
    main_targets: ShapeTargets
    crop_targets: ShapeTargets

    @staticmethod
    def make(seed: int, resolution: int) -> "EvalObject":
        obj = make_object(seed)
        field = obj.field("cpu")
        surface = surface_samples(field, 32).cpu().double().numpy()
        main = ProceduralDataset("eval", views_per_object=1).views(obj, surface)[0]
        crop = crop_view(main, surface)
        return EvalObject(seed, field, main, crop, shape_targets(PosedObject(field, main), resolution),
                          shape_targets(PosedObject(field, crop), resolution))


def target_views(t: ShapeTargets) -> Views:
    """One view's targets in the training batch layout (`batches.ViewGenerator`)."""
    coords = torch.cat([torch.zeros(len(t.coords), 1, dtype=torch.int32), t.coords.int()], 1)
    return Views({"cameras": torch.zeros(1, 3)}, coords, {"offsets": t.offsets, "intersected": t.intersected, "split": t.split_weight,
                              "attributes": t.attributes})


def target_mesh(t: ShapeTargets) -> VoxelMesh:
    vertices, faces = flexible_dual_grid_to_mesh(t.coords, t.offsets, t.intersected, t.split_weight, t.resolution)
    return VoxelMesh(vertices, faces, t.coords, t.attributes, 1.0 / t.resolution)


class Encoders:
    """The training-only VAE encoders of a run (`RUN/<vae stage>/weights.safetensors`), posterior means."""

    def __init__(self, run: Path):
        self.nets = {}
        for stage in ("ss_vae", "shape_vae", "tex_vae"):
            self.nets.update(load_networks(run, stage, [trained_keys(stage)[0]], "cpu")[0])

    @torch.no_grad()
    def latents(self, t: ShapeTargets) -> tuple[torch.Tensor, SparseTensor, SparseTensor]:
        """(ss latent [1, 8, 16, 16, 16], shape latent, texture latent on the true 32^3 tokens), not normalised."""
        v = target_views(t)
        ss = self.nets["ss_encoder"](occupancy(v))[0]
        shape = self.nets["shape_encoder"](shape_inputs(v))[0]
        tex = self.nets["tex_encoder"](texture_inputs(v))[0]
        if not torch.equal(shape.coords, tex.coords):
            raise RuntimeError("the shape and texture encoders disagree on the tokens")
        return ss, shape, tex


def true_tokens(t: ShapeTargets) -> torch.Tensor:
    """The sparse-structure tokens [N, 4] of the targets (32^3 cells of their voxels), as the pipeline lists them."""
    coords = torch.cat([torch.zeros(len(t.coords), 1, dtype=torch.int32), t.coords.int()], 1)
    return coarsen(coords, t.resolution // configs.TOKEN_RESOLUTION).int()


# ---------------------------------------------------------------------------------------------------------
# Generators that `evaluate_object` can call
# ---------------------------------------------------------------------------------------------------------

class RowGenerator:
    """The eval's generator interface over one row: `mesh(request, rig)` -> VoxelMesh in the crop model frame
    (None: run the pipeline), exported and placed like a generation."""

    def __init__(self, model: LoadedModel, row: str, obj: EvalObject, encoders: Encoders | None):
        self.model, self.row, self.obj, self.encoders = model, row, obj, encoders
        self.service = Generator(model)
        self.captured: dict = {}

    def capabilities(self) -> dict:
        return {"max_views": 1}

    def _export(self, mesh: VoxelMesh, resolution: int, options) -> object:
        mesh = orient_outward(mesh)
        return export_asset(mesh.vertices, mesh.faces, mesh.coords, mesh.attrs, resolution,
                            ExportOptions(face_target=options.face_target, remesh=options.remesh,
                                          texture_size=options.texture_size, normal_map=options.normal_map,
                                          unwrap=options.unwrap), device="cpu")

    def run(self, request, on_progress, should_cancel) -> Generation:
        images = []
        for view in request.views:
            image = Image.open(io.BytesIO(view.image_png))
            image.load()
            images.append(image)
        rig = self.service.rig(request.views, images)
        o, options = self.obj, request.options
        res = o.crop_targets.resolution
        if self.row == "exact":
            asset = self._export(target_mesh(o.main_targets), res, options)
            generation = ExactGeneration(asset, rig, {}, o.main)
        elif self.row == "targets":
            generation = Generation(self._export(target_mesh(o.crop_targets), res, options), rig, {})
        elif self.row in ("vae", "vae_voxels"):
            generation = Generation(self._export(self.vae_mesh(self.row == "vae_voxels"), res, options), rig, {})
        else:
            generation = self.run_pipeline(request, on_progress, should_cancel)
        self.captured.update(generation=generation, rig=rig)
        return generation

    @torch.no_grad()
    def vae_mesh(self, true_voxels: bool) -> VoxelMesh:
        pipe, t = self.model.pipeline, self.obj.crop_targets
        _, shape, tex = self.encoders.latents(t)
        guides = None
        if true_voxels:
            levels = pipe.models["shape_slat_decoder"].num_upsamplings
            guides = subdivision_guides(shape.coords, target_views(t).coords, levels, t.resolution)[0]
        mesh = pipe.decode(shape, tex, t.resolution, guide_subs=guides)
        self.captured["decoded"] = mesh
        return mesh

    def run_pipeline(self, request, on_progress, should_cancel) -> Generation:
        """The real generator, with the sparse structure (gt_ss, gt_shape) and the shape latent (gt_shape) replaced
        by the ground truth's; records the sparse structure and the decoded voxels."""
        pipe = self.model.pipeline
        originals = {k: getattr(pipe, k) for k in ("sample_sparse_structure", "sample_shape_lr", "run")}
        targets = self.obj.crop_targets

        def sparse_structure(run):
            coords = true_tokens(targets) if self.row != "model" else originals["sample_sparse_structure"](run)
            self.captured["ss"] = coords
            return coords

        def shape_lr(run, coords):
            if self.row == "gt_shape":
                z = self.encoders.latents(targets)[1]
                # consume the noise the flow would have drawn, so the texture stage sees the same noise as "model"
                torch.randn(coords.shape[0], pipe.models["shape_slat_flow_model_512"].out_channels,
                            generator=run.generator)
                return z
            return originals["sample_shape_lr"](run, coords)

        def run_and_capture(*args, **kwargs):
            out = originals["run"](*args, **kwargs)
            self.captured["decoded"] = out.mesh
            return out

        pipe.sample_sparse_structure, pipe.sample_shape_lr, pipe.run = sparse_structure, shape_lr, run_and_capture
        try:
            return self.service.run(request, on_progress, should_cancel)
        finally:
            for k in originals:
                delattr(pipe, k)


class ExactGeneration(Generation):
    """A generation placed exactly in the eval's render camera (the GLB frame of the render view's model frame)."""

    def __init__(self, asset, rig, metadata, view: View):
        super().__init__(asset, rig, metadata)
        self.view = view

    def glb_to_camera(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.eye(3) / self.view.mesh_scale @ R_MODEL_TO_GLB.T
        m[2, 3] = -self.view.distance
        return m


# ---------------------------------------------------------------------------------------------------------
# Sparse structure and colour checks
# ---------------------------------------------------------------------------------------------------------

def token_cubes(coords: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A closed box mesh (model frame) of every token `coords` [N, 4] of an r^3 grid: (vertices, faces)."""
    corners = torch.tensor([[i & 1, i >> 1 & 1, i >> 2 & 1] for i in range(8)], dtype=torch.float32)
    quads = [(0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5)]
    tri = torch.tensor([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    vertices = ((coords[:, None, 1:].float() + corners) / resolution - 0.5).reshape(-1, 3)
    faces = (tri[None] + 8 * torch.arange(len(coords))[:, None, None]).reshape(-1, 3)
    return vertices, faces


def silhouette(vertices: torch.Tensor, faces: torch.Tensor, glb_to_camera: np.ndarray, view: View, size: int,
               supersample: int) -> torch.Tensor:
    """Input-view coverage mask of a model-frame mesh placed by `glb_to_camera` (as the eval places assets)."""
    place = torch.from_numpy(glb_to_camera).float()
    glb = vertices @ torch.from_numpy(R_MODEL_TO_GLB).float().T
    cam = glb @ place[:3, :3].T + place[:3, 3]
    texture = torch.ones(1, 1, 4)
    r = render_albedo(cam, faces, torch.zeros(len(cam), 2), texture, intrinsics_of(view, size), "OPAQUE", 0.5,
                      supersample)
    return r.coverage > 0.5


def token_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    key = lambda c: set(map(tuple, c[:, 1:].tolist()))
    sa, sb = key(a), key(b)
    return len(sa & sb) / max(1, len(sa | sb))


@torch.no_grad()
def sparse_structure_report(model: LoadedModel, obj: EvalObject, encoders: Encoders, predicted: torch.Tensor | None,
                            glb_to_camera: np.ndarray, reference_mask: torch.Tensor, size: int, supersample: int
                            ) -> dict:
    """The 32^3 tokens of the truth, of the SS VAE (true occupancy encoded and decoded) and of the SS flow
    (`predicted`, the model row's): token IoU and input-view mask IoU of their cubes."""
    truth = true_tokens(obj.crop_targets)
    ss, _, _ = encoders.latents(obj.crop_targets)
    vae = occupancy_to_coords(model.pipeline.models["sparse_structure_decoder"](ss), configs.TOKEN_RESOLUTION)
    mask = lambda c: silhouette(*token_cubes(c, configs.TOKEN_RESOLUTION), glb_to_camera, obj.main, size, supersample)
    truth_mask = mask(truth)
    out = {"tokens_true": len(truth), "tokens_vae": len(vae), "token_iou_vae": token_iou(vae, truth),
           "mask_iou_true_cubes_vs_object": mask_iou(truth_mask, reference_mask),
           "mask_iou_vae_vs_true_cubes": mask_iou(mask(vae), truth_mask)}
    if predicted is not None:
        out.update(tokens_flow=len(predicted), token_iou_flow=token_iou(predicted, truth),
                   mask_iou_flow_vs_true_cubes=mask_iou(mask(predicted), truth_mask))
    return out


@torch.no_grad()
def texture_vae_report(model: LoadedModel, obj: EvalObject, encoders: Encoders) -> dict:
    """The texture VAE on the object's own voxels, teacher-forced to the true hierarchy (so decoded and target
    voxels pair up): per-channel target mean and std, decoded mean and std, mean absolute error."""
    t = obj.crop_targets
    decoder = model.pipeline.models["tex_slat_decoder"]
    _, _, tex = encoders.latents(t)
    v = target_views(t)
    guides, coords = subdivision_guides(tex.coords, v.coords, decoder.num_upsamplings, t.resolution)
    decoded = decoder(tex, guide_subs=guides).feats * 0.5 + 0.5
    target = t.attributes[lookup(coords, v.coords, t.resolution)]
    r = lambda x: [round(float(a), 4) for a in x]
    return {"channels": "r g b metallic roughness alpha", "target_mean": r(target.mean(0)),
            "target_std": r(target.std(0)), "decoded_mean": r(decoded.mean(0)), "decoded_std": r(decoded.std(0)),
            "mae": r((decoded - target).abs().mean(0))}


def _srgb_to_linear(c):
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c):
    c = c.clamp(0, 1)
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def colour_report(generation: Generation, reference, view: View, size: int, supersample: int) -> dict:
    """Albedo colours of a row's asset against the ground truth over both opaque masks (straight colour): PSNR
    under the identity, every other channel order and both sRGB/linear transfers; mean RGB of each side."""
    a = generation.asset
    place = torch.from_numpy(generation.glb_to_camera()).float()
    cam = torch.from_numpy(a.positions).float() @ place[:3, :3].T + place[:3, 3]
    gen = render_albedo(cam, torch.from_numpy(a.faces.astype(np.int64)), torch.from_numpy(a.uvs),
                        torch.from_numpy(a.base_color).float() / 255, intrinsics_of(view, size), a.alpha_mode,
                        a.alpha_cutoff, supersample)
    both = (gen.coverage > 0.99) & (reference.coverage > 0.99) & (gen.alpha > 0.99) & (reference.alpha > 0.99)
    if not both.any():
        return {}
    g, r = gen.color, reference.color
    out = {"pixels": int(both.sum()), "mean_rgb_true": r[:, both].mean(1).tolist(),
           "mean_rgb_asset": g[:, both].mean(1).tolist()}
    psnr = {"identity": masked_psnr(g, r, both)}
    for order in itertools.permutations(range(3)):
        if order != (0, 1, 2):
            psnr["rgb->" + "".join("rgb"[i] for i in order)] = masked_psnr(g[list(order)], r, both)
    psnr["srgb_to_linear(asset)"] = masked_psnr(_srgb_to_linear(g), r, both)
    psnr["linear_to_srgb(asset)"] = masked_psnr(_linear_to_srgb(g), r, both)
    out["psnr_opaque"] = psnr
    return out


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

def diagnose(model: LoadedModel, seeds: list[int], rows=ROWS, vae_run: Path = DEFAULT_VAE_RUN,
             options: EvalOptions | None = None, log=lambda s: None) -> dict:
    options = options or EvalOptions(generation=dict(EVAL_GENERATION))
    encoders = Encoders(vae_run)
    resolution = model.resolutions[0]
    results = {"rows": list(rows), "objects": []}
    for seed in seeds:
        obj = EvalObject.make(seed, resolution)
        reference = render_ground_truth(obj.field, obj.main, options.image_size, options.supersample)
        record = {"seed": seed, "rows": {}, "colour": {}}
        predicted, rig = None, None
        for row in rows:
            t0 = time.perf_counter()
            generator = RowGenerator(model, row, obj, encoders)
            metrics, grid = evaluate_object(generator, seed, options)
            record["rows"][row] = metrics
            record["colour"][row] = colour_report(generator.captured["generation"], reference, obj.main,
                                                  options.image_size, options.supersample)
            rig = generator.captured["rig"]
            if row == "model":
                predicted = generator.captured["ss"]
            if options.out is not None:
                grid.save(options.out / f"{seed}_{row}.png")
            log(f"{seed} {row}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in METRICS)
                + f" ({time.perf_counter() - t0:.0f} s)")
        record["sparse_structure"] = sparse_structure_report(
            model, obj, encoders, predicted, rig.glb_to_camera(), reference.coverage > 0.5, options.image_size,
            options.supersample)
        log(f"{seed} sparse structure: {json.dumps(record['sparse_structure'])}")
        record["texture_vae"] = texture_vae_report(model, obj, encoders)
        log(f"{seed} texture VAE (teacher-forced, per channel): {json.dumps(record['texture_vae'])}")
        results["objects"].append(record)
    results["mean"] = {row: {k: float(np.mean([o["rows"][row][k] for o in results["objects"]])) for k in METRICS}
                       for row in rows}
    ss = [o["sparse_structure"] for o in results["objects"]]
    results["mean_sparse_structure"] = {k: float(np.mean([s[k] for s in ss])) for k in ss[0] if k in ss[-1]}
    return results


def table(results: dict) -> str:
    short = ("IoU", "PSNR", "SSIM", "F.05 vis", "F.05 full", "CD vis", "CD full", "d-scale")
    lines = [f"{'row':<10}" + "".join(f"{s:>10}" for s in short)]
    for row, m in results["mean"].items():
        lines.append(f"{row:<10}" + "".join(f"{m[k]:>10.4f}" for k in METRICS))
    lines.append("sparse structure (mean): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                          results["mean_sparse_structure"].items()))
    for o in results["objects"]:
        for row, c in o["colour"].items():
            if c:
                best = max(c["psnr_opaque"], key=c["psnr_opaque"].get)
                lines.append(f"colour {o['seed']} {row:<9} PSNR opaque {c['psnr_opaque']['identity']:.2f} "
                             f"(best {best} {c['psnr_opaque'][best]:.2f}); mean RGB true "
                             + " ".join(f"{x:.3f}" for x in c["mean_rgb_true"]) + ", asset "
                             + " ".join(f"{x:.3f}" for x in c["mean_rgb_asset"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--vae", type=Path, default=DEFAULT_VAE_RUN, help="run folder with ss_vae/, shape_vae/, tex_vae/ "
                   "weights holding the encoders (the bundled model's decoders are used)")
    p.add_argument("--model", type=Path, default=None, help="snapshot folder (default: the bundled model)")
    p.add_argument("--points", type=int, default=EvalOptions.points)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model, device="cpu")
    options = EvalOptions(points=a.points, generation=dict(EVAL_GENERATION), out=a.out)
    seeds = [seed_of("eval", a.first + i) for i in range(a.objects)]
    results = diagnose(model, seeds, a.rows, a.vae, options, log=lambda s: print(s, file=sys.stderr, flush=True))
    (a.out / "diagnose.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

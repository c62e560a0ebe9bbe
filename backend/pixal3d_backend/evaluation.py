"""`pixal3d eval`: how faithful a model's assets are on the held-out procedural set.

For each eval object (seeds `data.seed_of("eval", i)`, disjoint from training by construction) the conditioning
view is the eval dataset's first view of it (training camera relation: the object posed in the camera's
view-aligned model frame, random FOV), rendered as RGBA and sent through `service.Generator.run` exactly as the
server would; with `views` K > 1, K - 1 more cameras orbit the object at the same elevation (evenly spaced in
azimuth) and are sent posed in view 0's world, as the add-on's multi-view source does. The asset then goes back
into the input camera with the product's own placement, `Generation.glb_to_camera()` (off-axis crop shear
included; the scene scale too when several cameras fixed it), and is measured against the procedural SDF:

* Input view (2-D): mask IoU of the geometric silhouettes, and PSNR / SSIM over the union of both masks.
  Both sides are *albedo* renders (sRGB base colour x material alpha, unlit, on black): the asset carries PBR
  maps, not the input's lights, and re-lighting it without the input renderer's soft shadows would charge
  lighting-model differences to the texture. Geometry is measured separately below.
* Shape (3-D), in the ground truth's model frame (object in [-0.5, 0.5]^3): Chamfer distance (mean of both
  directions' mean Euclidean nearest-neighbour distance) and F-score at 0.01 and 0.05 (Tatarchenko et al. 2019),
  on the surface visible from the input camera and on the full surface. One image fixes the object only up to a
  scale about the camera centre (a twice larger object twice as far away gives the same image), so the asset is
  first rescaled about the camera centre by the median ratio of the two depth maps over their common mask
  (median scaling, Eigen et al. 2014); the factor is reported as `depth_scale` (1 = the placement was exact).
  A point is visible when it is at most `visibility_tolerance` behind its own surface's depth map; both sides
  use the same rule at the same (supersampled) resolution.

`evaluate(model, seeds, options)` is the library entry point (tests call it); `main` is the CLI.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import protocol
from .camera import R_MODEL_TO_WORLD, Intrinsics
from .data import ProceduralDataset, make_object, render_views, seed_of, surface_samples
from .data.render import pixel_rays, sphere_trace
from .data.shapes import ObjectField
from .data.views import View, framing_distance, rotation_y
from .loading import LoadedModel
from .protocol import Options, SubmitRequest
from .render_mesh import Rendered, project, render_albedo, scaled
from .server import check_image_pixels
from .service import Generator, add_model_arguments, model_from_arguments

Tensor = torch.Tensor

THRESHOLDS = (0.01, 0.05)               # F-score distances, model-frame units (the object spans ~1)
NOVEL_AZIMUTHS = (90.0, 180.0)          # degrees about the object's up axis, for the grid


@dataclass
class EvalOptions:
    image_size: int = 512               # conditioning image side, pixels
    supersample: int = 2                # samples per pixel side for every render (both sides alike)
    views: int = 1                      # cameras around the object sent to the generator; view 0 conditions
    points: int = 100_000               # surface samples per side for the 3-D metrics
    visibility_tolerance: float = 0.01  # model-frame units a point may lie behind the depth map and count visible
    generation: dict = field(default_factory=dict)   # protocol.Options overrides over the model's defaults
    out: Path | None = None             # where the grids and metrics.json go (None: nowhere)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------

def mask_iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def masked_psnr(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """PSNR (peak 1) of images [C, H, W] over the pixels of `mask` [H, W], all channels."""
    mse = ((a - b) ** 2)[:, mask].mean()
    return float(10.0 * torch.log10(1.0 / mse))


def ssim_map(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM [H, W] (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, peak 1),
    averaged over channels. Borders are reflect-padded so every pixel of a mask has a value."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2.0
    g = torch.exp(-x ** 2 / (2.0 * sigma ** 2))
    g = (g / g.sum()).float().to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(a.shape[0], 1, window, window)
    blur = lambda t: F.conv2d(F.pad(t[None], [window // 2] * 4, mode="reflect"), kernel, groups=a.shape[0])[0]
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=0)


def masked_ssim(a: Tensor, b: Tensor, mask: Tensor) -> float:
    return float(ssim_map(a, b)[mask].mean())


def _nearest_in_bins(a: Tensor, b: Tensor, cell: float, max_pairs: int = 1 << 23) -> Tensor:
    """Distance from each point of `a` to its nearest point of `b` among the 27 grid bins of side `cell` around
    it (inf if they are empty). Exact for every query whose nearest neighbour is within `cell`."""
    origin = torch.minimum(a.amin(dim=0), b.amin(dim=0)) - cell          # bin indices >= 1, so offsets stay >= 0
    bin_a, bin_b = ((a - origin) / cell).long(), ((b - origin) / cell).long()
    side = int(torch.maximum(bin_a.amax(), bin_b.amax())) + 2
    key = lambda bins: (bins[:, 0] * side + bins[:, 1]) * side + bins[:, 2]
    order = key(bin_b).argsort()
    sorted_keys = key(bin_b)[order]
    device = a.device
    best = torch.full((len(a),), float("inf"), device=device)
    for offset in torch.cartesian_prod(*[torch.tensor([-1, 0, 1], device=device)] * 3):
        k = key(bin_a + offset)
        start = torch.searchsorted(sorted_keys, k)
        count = torch.searchsorted(sorted_keys, k, right=True) - start
        bounds = torch.searchsorted(count.cumsum(0), torch.arange(max_pairs, int(count.sum()) + max_pairs, max_pairs,
                                                                  device=device), right=True)
        for lo, hi in zip([0] + bounds[:-1].tolist(), bounds.tolist()):
            hi = max(hi, lo + 1)                                         # a single query may exceed the budget
            n = count[lo:hi]
            query = torch.arange(lo, hi, device=device).repeat_interleave(n)
            rank = torch.arange(int(n.sum()), device=device) - (n.cumsum(0) - n).repeat_interleave(n)
            candidate = order[start[lo:hi].repeat_interleave(n) + rank]
            best.scatter_reduce_(0, query, (a[query] - b[candidate]).norm(dim=1), reduce="amin")
    return best


def nearest_distances(a: Tensor, b: Tensor, cell: float = 0.02) -> Tensor:
    """Exact distance from each point of `a [N, 3]` to its nearest point of `b [M, 3]` (inf if b is empty).

    Dense samplings (~1e5 points a side, so that sampling gaps stay well under the 0.01 F-score threshold) are too
    many for all-pairs distances on a CPU. Grid bins find every neighbour within the bin side; queries with none
    that near are searched again with bins twice as large, until the bins span both point sets.
    """
    best = torch.full((len(a),), float("inf"), device=a.device)
    if not len(b):
        return best
    todo = torch.arange(len(a), device=a.device)
    while len(todo):
        best[todo] = _nearest_in_bins(a[todo], b, cell)
        todo = todo[best[todo] > cell]
        cell *= 2.0
    return best


def chamfer_fscore(reference: Tensor, generated: Tensor, thresholds=THRESHOLDS) -> dict[str, float]:
    """Chamfer distance (mean of the two directions' mean nearest-neighbour distances) and, per threshold t,
    F-score = harmonic mean of precision (generated points within t of the reference) and recall (reference
    points within t of the generated)."""
    to_generated = nearest_distances(reference, generated)
    to_reference = nearest_distances(generated, reference)
    out = {"chamfer": float((to_generated.mean() + to_reference.mean()) / 2.0)}
    for t in thresholds:
        precision, recall = float((to_reference < t).float().mean()), float((to_generated < t).float().mean())
        out[f"f@{t:g}"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out


def sample_surface(vertices: Tensor, faces: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` points uniformly distributed over the area of a triangle mesh."""
    tri = vertices[faces.long()]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=1)
    face = torch.multinomial(area, count, replacement=True, generator=generator)
    r1, r2 = torch.rand(2, count, 1, generator=generator)
    s = r1.sqrt()                                      # uniform in the triangle (Osada et al. 2002)
    t = tri[face]
    return (1 - s) * t[:, 0] + s * (1 - r2) * t[:, 1] + s * r2 * t[:, 2]


def visible(points: Tensor, depth: Tensor, intrinsics: Intrinsics, tolerance: float) -> Tensor:
    """Which camera-local `points` are at most `tolerance` behind the depth map `depth` [H, W] of `intrinsics`."""
    xy, z = project(points, intrinsics)
    px, py = xy[:, 0].floor().long(), xy[:, 1].floor().long()
    inside = (px >= 0) & (px < intrinsics.width) & (py >= 0) & (py < intrinsics.height) & (z > 0)
    surface = torch.full_like(z, float("inf"))
    surface[inside] = depth[py[inside], px[inside]]
    return inside & (z <= surface + tolerance)


# ---------------------------------------------------------------------------------------------------------
# Ground truth and cameras
# ---------------------------------------------------------------------------------------------------------

def model_to_camera(view: View, v: Tensor) -> Tensor:
    """Model-frame points of `view` -> its camera-local points (`camera.py`: p = v / mesh_scale - (0, 0, d))."""
    return v / view.mesh_scale - torch.tensor([0.0, 0.0, view.distance], dtype=v.dtype, device=v.device)


def camera_to_model(view: View, p: Tensor) -> Tensor:
    return (p + torch.tensor([0.0, 0.0, view.distance], dtype=p.dtype, device=p.device)) * view.mesh_scale


def posed(view: View, x: Tensor) -> Tensor:
    """Normalised-object points -> the view's model frame (`View.model_points`, in torch)."""
    as_tensor = lambda a: torch.tensor(a, dtype=x.dtype, device=x.device)
    return view.scale * x @ as_tensor(view.rotation).T + as_tensor(view.translation)


def intrinsics_of(view: View, size: int) -> Intrinsics:
    """The square render camera of `data.render` (centred principal point, horizontal FOV = view.fov)."""
    return Intrinsics.from_hfov(size, size, view.fov)


def orbit_view(view: View, surface: np.ndarray, azimuth: float) -> View:
    """`view`'s camera moved by `azimuth` radians about the object's up axis (same elevation, FOV, lights and
    object scale, so every orbit view shares view 0's metric frame), framed like a training view."""
    rotation = view.rotation @ rotation_y(azimuth)
    distance = framing_distance(view.scale * surface @ rotation.T, view.fov, view.mesh_scale)
    return View(rotation, view.scale, view.fov, distance, view.lighting, view.mesh_scale)


def camera_to_world(main: View, view: View) -> np.ndarray:
    """Camera-to-world of `view` for the protocol, in the Blender-style world of `main`'s model frame
    (`camera.R_MODEL_TO_WORLD`, camera units), so view 0 is the official front view at (0, -d, 0). Both views pose
    the same object at the same scale: `v = scale R x + translation`, so `v_main = R_main R_view^T (v_view -
    t_view) + t_main`, and the view's camera sits at `v_view = (0, 0, mesh_scale d)`."""
    if view.scale != main.scale or view.mesh_scale != main.mesh_scale:
        raise ValueError("the views of one object must share its scale")
    to_main = main.rotation @ view.rotation.T              # view's model frame -> main's model frame
    centre = to_main @ (np.array([0.0, 0.0, view.mesh_scale * view.distance]) - view.translation) + main.translation
    c2w = np.eye(4)
    c2w[:3, :3] = R_MODEL_TO_WORLD @ to_main
    c2w[:3, 3] = R_MODEL_TO_WORLD @ centre / main.mesh_scale
    return c2w


def render_ground_truth(field: ObjectField, view: View, size: int, supersample: int) -> Rendered:
    """Unlit albedo render of the procedural object (the counterpart of `render_mesh.render_albedo`)."""
    hi = size * supersample
    origins, dirs = pixel_rays(view, hi, field.device)
    pixel_angle = torch.full((len(dirs),), 1.0 / scaled(intrinsics_of(view, size), supersample).focal,
                             device=field.device)
    hit, t = sphere_trace(field, origins, dirs, pixel_angle)
    points = origins[hit] + t[hit, None] * dirs[hit]
    _, part = field.sdf_and_part(points)
    attributes = field.attributes(points, part).clamp(0.0, 1.0)
    image = torch.zeros(hi * hi, 5, device=field.device)
    alpha = attributes[:, 5:6]
    image[hit] = torch.cat([attributes[:, :3] * alpha, alpha, torch.ones_like(alpha)], dim=1)
    depth = torch.full((hi * hi,), float("inf"), device=field.device)
    depth[hit] = -model_to_camera(view, posed(view, points))[:, 2]
    pooled = F.avg_pool2d(image.reshape(hi, hi, 5).permute(2, 0, 1)[None], supersample)[0]
    return Rendered(color=pooled[:3], alpha=pooled[3], coverage=pooled[4], depth=depth.reshape(hi, hi))


# ---------------------------------------------------------------------------------------------------------
# One object
# ---------------------------------------------------------------------------------------------------------

def _png(rgba: Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((rgba.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy(), "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _panel(color: Tensor, alpha: Tensor, background: float = 0.5) -> np.ndarray:
    """Display only: premultiplied colour [3, H, W] over a grey background, uint8 [H, W, 3]."""
    rgb = color + background * (1.0 - alpha)
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _grid(panels: list[list[np.ndarray]], labels: list[list[str]]) -> Image.Image:
    rows = [np.concatenate(row, axis=1) for row in panels]
    image = Image.fromarray(np.concatenate(rows, axis=0))
    draw, size = ImageDraw.Draw(image), panels[0][0].shape[0]
    for i, row in enumerate(labels):
        for j, text in enumerate(row):
            draw.text((j * size + 4, i * size + 4), text, fill=(255, 255, 255))
    return image


def evaluate_object(generator: Generator, seed: int, options: EvalOptions) -> tuple[dict, Image.Image]:
    t0 = time.perf_counter()
    size, ss = options.image_size, options.supersample
    device = torch.device(getattr(generator, "device", "cpu"))   # the ground truth and metrics run beside the model
    obj = make_object(seed)
    object_field = obj.field(device)
    surface = surface_samples(object_field, 32).cpu().double().numpy()           # as the dataset frames its views
    main = ProceduralDataset("eval", views_per_object=1).views(obj, surface)[0]
    views = [main] + [orbit_view(main, surface, 2 * math.pi * k / options.views) for k in range(1, options.views)]
    renders = render_views(object_field, views, size, ss)
    images = [_png(renders.rgba[k]) for k in range(len(views))]
    for k, png in enumerate(images):     # the server's own check: an all see-through object leaves the crop nothing
        check_image_pixels(png, f"eval object {seed} view {k}")
    request = SubmitRequest([protocol.View(images[k], protocol.Camera(
        hfov=v.fov, width=size, height=size, c2w=camera_to_world(main, v))) for k, v in enumerate(views)],
        Options(**{**generator.model.default_options, **options.generation}))
    t_generate = time.perf_counter()
    generation = generator.run(protocol.check(request), lambda *_: None, lambda: False)
    t_generate = time.perf_counter() - t_generate

    asset = generation.asset
    faces = torch.from_numpy(asset.faces.astype(np.int64)).to(device)
    placement = torch.from_numpy(generation.glb_to_camera()).float().to(device)
    cam_points = torch.from_numpy(asset.positions).float().to(device) @ placement[:3, :3].T + placement[:3, 3]
    uvs = torch.from_numpy(asset.uvs).to(device)
    texture = torch.from_numpy(asset.base_color).to(device).float() / 255.0
    albedo = lambda points, K, s: render_albedo(points, faces, uvs, texture, K, asset.alpha_mode, asset.alpha_cutoff, s)
    K = intrinsics_of(main, size)
    gen = albedo(cam_points, K, ss)
    ref = render_ground_truth(object_field, main, size, ss)

    gt_mask, gen_mask = ref.coverage > 0.5, gen.coverage > 0.5
    union = gt_mask | gen_mask
    both = torch.isfinite(ref.depth) & torch.isfinite(gen.depth)
    depth_scale = float((ref.depth[both] / gen.depth[both]).median()) if both.any() else 1.0

    rng = torch.Generator().manual_seed(seed)
    reference = posed(main, surface_samples(object_field, 256).float())    # ~2-4e5 points
    reference = reference[torch.randperm(len(reference), generator=rng)[:options.points].to(device)]
    generated_cam = sample_surface(cam_points.cpu(), faces.cpu(), options.points, rng).to(device) * depth_scale
    tolerance = options.visibility_tolerance / main.mesh_scale
    K_hi = scaled(K, ss)
    ref_visible = visible(model_to_camera(main, reference), ref.depth, K_hi, tolerance)
    gen_visible = visible(generated_cam, gen.depth * depth_scale, K_hi, tolerance)
    generated = camera_to_model(main, generated_cam)
    metrics = {"seed": seed, "category": obj.category, "fov_deg": math.degrees(main.fov),
               "iou": mask_iou(gt_mask, gen_mask), "psnr": masked_psnr(gen.color, ref.color, union),
               "ssim": masked_ssim(gen.color, ref.color, union), "depth_scale": depth_scale,
               **{f"{k}_visible": v for k, v in chamfer_fscore(reference[ref_visible], generated[gen_visible]).items()},
               **{f"{k}_full": v for k, v in chamfer_fscore(reference, generated).items()},
               "faces": len(faces), "generate_s": t_generate}

    # Grid: top row what was asked for (input | re-render | novel views of the asset), bottom row the reference
    # (silhouette overlap: yellow both, red missed, green extra | ground-truth albedo at the same cameras).
    model_points = camera_to_model(main, cam_points * depth_scale)
    overlap = torch.stack([gt_mask, gen_mask, torch.zeros_like(gt_mask)]).float()
    top = [_panel(renders.conditioning[0], renders.rgba[0, 3]), _panel(gen.color, gen.alpha)]
    bottom = [(overlap * 255).byte().permute(1, 2, 0).cpu().numpy(), _panel(ref.color, ref.alpha)]
    for azimuth in NOVEL_AZIMUTHS:
        novel = orbit_view(main, surface, math.radians(azimuth))
        to_novel = torch.tensor(novel.rotation @ main.rotation.T, dtype=torch.float32, device=device)
        novel_points = model_to_camera(novel, model_points @ to_novel.T)
        # Display only, so one sample per pixel: sphere tracing is the slowest part of an evaluation on a CPU.
        generated_view = albedo(novel_points, intrinsics_of(novel, size), 1)
        reference_view = render_ground_truth(object_field, novel, size, 1)
        top.append(_panel(generated_view.color, generated_view.alpha))
        bottom.append(_panel(reference_view.color, reference_view.alpha))
    labels = [["input", "generated", f"generated +{NOVEL_AZIMUTHS[0]:g}", f"generated +{NOVEL_AZIMUTHS[1]:g}"],
              ["masks", "reference", f"reference +{NOVEL_AZIMUTHS[0]:g}", f"reference +{NOVEL_AZIMUTHS[1]:g}"]]
    metrics["total_s"] = time.perf_counter() - t0
    return metrics, _grid([top, bottom], labels)


# ---------------------------------------------------------------------------------------------------------
# The set
# ---------------------------------------------------------------------------------------------------------

METRICS = ("iou", "psnr", "ssim", "chamfer_visible", "f@0.01_visible", "f@0.05_visible", "chamfer_full",
           "f@0.01_full", "f@0.05_full", "depth_scale")


def evaluate(model: LoadedModel | Generator, seeds: list[int], options: EvalOptions | None = None,
             on_object=lambda metrics: None) -> dict:
    """Metrics of `model` on the eval objects `seeds`: {"objects": [per-object dicts], "mean": {...}, ...}.
    Writes `<seed>.png` grids and `metrics.json` to `options.out` when it is set. `model` may also be anything
    with a Generator's `run`, `capabilities` and `model` (tests pass an oracle). `on_object` sees each object's
    metrics as soon as they are measured (a long CPU run reports progress through it). An object whose input the
    server would reject (`server.check_image_pixels`: e.g. every part see-through) is listed under "rejected" with the
    error, and left out of the means."""
    generator = Generator(model) if isinstance(model, LoadedModel) else model
    options = options or EvalOptions()
    max_views = generator.capabilities()["max_views"]
    if options.views > max_views:
        raise ValueError(f"--views {options.views}: the generator takes at most {max_views} view(s)")
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
    objects, rejected = [], []

    def summary() -> dict:
        result = {"model_id": generator.model.model_id, "model_hash": generator.model.model_hash,
                  "options": {**{k: v for k, v in vars(options).items() if k not in ("generation", "out")},
                              "generation": dict(options.generation)},
                  "objects": objects, "rejected": rejected,
                  "mean": {k: float(np.mean([o[k] for o in objects])) if objects else float("nan") for k in METRICS}}
        if options.out is not None:       # after every object, so a run stopped early keeps what it measured
            (options.out / "metrics.json").write_text(json.dumps(result, indent=2))
        return result

    for seed in seeds:
        try:
            metrics, grid = evaluate_object(generator, seed, options)
        except protocol.ProtocolError as error:      # an input the product rejects is reported, not averaged
            rejected.append({"seed": seed, "category": make_object(seed).category, "error": error.message})
            on_object(rejected[-1])
            continue
        objects.append(metrics)
        on_object(metrics)
        if options.out is not None:
            grid.save(options.out / f"{seed}.png")
        summary()
    return summary()


TABLE_COLUMNS = {"iou": "IoU", "psnr": "PSNR", "ssim": "SSIM", "chamfer_visible": "CD vis", "f@0.01_visible": "F.01 vis",
                 "f@0.05_visible": "F.05 vis", "chamfer_full": "CD full", "f@0.05_full": "F.05 full",
                 "depth_scale": "d-scale"}


def table_header() -> str:
    return f"{'seed':>15} {'category':<9}" + "".join(f"{s:>10}" for s in TABLE_COLUMNS.values()) + f"{'time s':>8}"


def table_row(o: dict) -> str:
    """An object's metrics, or for an object the server rejected (`evaluate`'s "rejected"), why."""
    if "error" in o:
        return f"{o['seed']:>15} {o['category']:<9} not generated: {o['error']}"
    return (f"{o['seed']:>15} {o['category']:<9}" + "".join(f"{o[k]:>10.4f}" for k in TABLE_COLUMNS)
            + f"{o['total_s']:>8.1f}")


def table(result: dict) -> str:
    lines = [table_header(), *map(table_row, result["objects"])]
    lines.append(f"{'mean':>15} {'':<9}" + "".join(f"{result['mean'][k]:>10.4f}" for k in TABLE_COLUMNS))
    lines += map(table_row, result.get("rejected", []))
    return "\n".join(lines)


def view_comparison(results: dict[int, dict]) -> str:
    """Mean metrics per number of cameras, and each count's full-shape Chamfer change against the first count."""
    counts = list(results)
    base = results[counts[0]]["mean"]["chamfer_full"]
    lines = [f"{'views':>5}{'IoU':>10}{'CD vis':>10}{'CD full':>10}{'F.05 full':>10}{'CD full vs ' + str(counts[0]):>16}"]
    for k in counts:
        m = results[k]["mean"]
        lines.append(f"{k:>5}{m['iou']:>10.4f}{m['chamfer_visible']:>10.4f}{m['chamfer_full']:>10.4f}"
                     f"{m['f@0.05_full']:>10.4f}{100.0 * (m['chamfer_full'] / base - 1.0):>+15.1f}%")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pixal3d eval", description="Evaluate a model on the held-out procedural set: "
                                "input-view mask IoU and masked PSNR/SSIM of albedo renders, visible-surface and "
                                "full-shape Chamfer distance and F-score, a PNG grid per object.")
    p.add_argument("--objects", type=int, default=16, help="how many eval objects")
    p.add_argument("--first", type=int, default=0, help="index of the first eval object")
    p.add_argument("--views", type=int, nargs="+", default=[1], help="cameras around the object sent to the "
                   "generator, evenly spaced in azimuth (view 0 is the input view); several counts, e.g. `--views 1 "
                   "4`, evaluate each and compare them")
    p.add_argument("--out", type=Path, default=Path("eval_out"), help="folder for the grids and metrics.json "
                   "(one sub-folder views<K> per count when several are compared)")
    p.add_argument("--image-size", type=int, default=EvalOptions.image_size)
    p.add_argument("--points", type=int, default=EvalOptions.points, help="surface samples per side")
    p.add_argument("--steps", type=int, help="sampler steps of every stage (shorthand for the three --*-steps)")
    add_model_arguments(p)
    a = p.parse_args(argv)
    model, generation = model_from_arguments(a)
    if a.steps is not None:
        generation.update(ss_steps=a.steps, shape_steps=a.steps, tex_steps=a.steps)
    seeds = [seed_of("eval", a.first + i) for i in range(a.objects)]
    results = {}
    for views in dict.fromkeys(a.views):
        out = a.out / f"views{views}" if len(a.views) > 1 else a.out
        options = EvalOptions(image_size=a.image_size, views=views, points=a.points, generation=generation, out=out)
        print(f"{views} view(s):\n{table_header()}", file=sys.stderr, flush=True)
        report = lambda m: print(table_row(m), file=sys.stderr, flush=True)
        results[views] = evaluate(model, seeds, options, report)
        print(f"{views} view(s):\n{table(results[views])}\nwrote {out / 'metrics.json'} and {len(seeds)} grids")
    if len(results) > 1:
        print(view_comparison(results))
    return 0

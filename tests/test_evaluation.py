"""`pixal3d eval`: metrics on cases with known answers, the rasteriser against analytic geometry and the camera
conventions, the whole evaluation with an oracle generator, and one real run with the bundled model."""
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from pixal3d_backend import evaluation
from pixal3d_backend.camera import CropCamera, Intrinsics, MultiViewRig
from pixal3d_backend.conditioning.preprocess import crop_geometry
from pixal3d_backend.data import (PosedObject, ProceduralDataset, make_object, reconstruct_mesh_from_targets, seed_of,
                                  shape_targets, surface_samples)
from pixal3d_backend.evaluation import (EvalOptions, chamfer_fscore, mask_iou, masked_psnr, masked_ssim,
                                        sample_surface)
from pixal3d_backend.export import ExportedAsset
from pixal3d_backend.render_mesh import interpolate, project, rasterize, render_albedo
from pixal3d_backend.service import Generation


def sphere(radius: float = 0.5, subdivisions: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


# -- metrics ------------------------------------------------------------------------------------------------

def test_mask_iou_identical_and_disjoint():
    a = torch.zeros(8, 8, dtype=torch.bool)
    a[:4] = True
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    half = a.clone()
    half[:, 4:] = False
    assert mask_iou(a, half) == pytest.approx(0.5)


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 64, 64, generator=g)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 16:48] = True
    assert masked_ssim(image, image, mask) == pytest.approx(1.0, abs=1e-5)
    assert masked_psnr(image, image + 0.1, mask) == pytest.approx(20.0, abs=1e-3)       # MSE 0.01
    noisy = (image + 0.2 * torch.randn(3, 64, 64, generator=g)).clamp(0, 1)
    assert masked_ssim(image, noisy, mask) < 0.9
    outside = image.clone()
    outside[:, ~mask] = 0.0                                   # changes outside the mask (and its window) only
    inner = torch.zeros_like(mask)
    inner[22:42, 22:42] = True
    assert masked_ssim(image, outside, inner) == pytest.approx(1.0, abs=1e-5)


def test_chamfer_of_a_mesh_against_itself():
    vertices, faces = sphere()
    a = sample_surface(vertices, faces, 30_000, torch.Generator().manual_seed(0))
    b = sample_surface(vertices, faces, 30_000, torch.Generator().manual_seed(1))
    assert (a.norm(dim=1) - 0.5).abs().max() < 5e-3           # on the surface
    exact = chamfer_fscore(a, a)
    assert exact["chamfer"] == 0.0 and exact["f@0.01"] == exact["f@0.05"] == 1.0
    # Independent samplings: only sampling gaps remain. For density rho = N / area the mean nearest distance is
    # 0.5 / sqrt(rho) = 0.0051 and a fraction 1 - exp(-pi 0.01^2 rho) = 0.95 lies within 0.01.
    resampled = chamfer_fscore(a, b)
    assert resampled["chamfer"] < 0.006 and resampled["f@0.01"] > 0.9 and resampled["f@0.05"] == 1.0


def test_nearest_distances_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3000, 3, generator=g), torch.rand(2000, 3, generator=g) * 0.5    # many queries beyond a bin
    brute = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
    assert torch.allclose(evaluation.nearest_distances(a, b), brute, atol=1e-6)


def test_fscore_thresholds():
    grid = torch.stack(torch.meshgrid(*[torch.arange(5.0) * 0.2] * 3, indexing="ij"), -1).reshape(-1, 3)
    shifted = grid + torch.tensor([0.03, 0.0, 0.0])           # every nearest neighbour is 0.03 away
    m = chamfer_fscore(grid, shifted)
    assert m["chamfer"] == pytest.approx(0.03, abs=1e-6)
    assert m["f@0.01"] == 0.0 and m["f@0.05"] == 1.0
    half = chamfer_fscore(grid, torch.cat([grid, grid + 1000.0]))    # half the generated points are far away
    assert half["f@0.01"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)      # precision 1/2, recall 1


# -- rasteriser and cameras ---------------------------------------------------------------------------------

def test_rasterizer_matches_an_analytic_sphere():
    vertices, faces = sphere(0.3, 5)
    centre = torch.tensor([0.25, -0.1, -2.0])                 # off-axis: its silhouette is an ellipse
    K = Intrinsics.from_hfov(200, 150, math.radians(40), shift_x=0.05, shift_y=-0.03)
    raster = rasterize(vertices + centre, faces, K)
    ys, xs = torch.meshgrid(torch.arange(K.height) + 0.5, torch.arange(K.width) + 0.5, indexing="ij")
    ray = torch.stack([(xs - K.cx) / K.focal, -(ys - K.cy) / K.focal, -torch.ones_like(xs)], -1)
    ray = ray / ray.norm(dim=-1, keepdim=True)
    along = ray @ centre
    hit = centre.norm() ** 2 - along ** 2 <= 0.3 ** 2
    assert mask_iou(hit, raster.mask) > 0.98
    depth = (along - (0.3 ** 2 - centre.norm() ** 2 + along ** 2).clamp(min=0).sqrt()) * -ray[..., 2]
    interior = hit & raster.mask & (centre.norm() ** 2 - along ** 2 < 0.25 ** 2)
    assert (raster.depth[interior] - depth[interior]).abs().max() < 1e-3


def test_perspective_correct_interpolation_and_texture_orientation():
    # A quad slanted in depth with uv = its own (x, y) parameters: perspective-correct interpolation gives the
    # ray-plane intersection's parameters; screen-linear interpolation would be off by ~0.1 here.
    corners = torch.tensor([[-1.0, 1.0, -2.0], [1.0, 1.0, -6.0], [1.0, -1.0, -6.0], [-1.0, -1.0, -2.0]])
    uvs = (corners[:, :2] * torch.tensor([0.5, -0.5]) + 0.5)  # glTF: v = 0 on the top edge
    faces = torch.tensor([[0, 3, 1], [1, 3, 2]])
    K = Intrinsics.from_hfov(64, 64, math.radians(60))
    raster = rasterize(corners, faces, K)
    uv = interpolate(raster, faces, uvs)
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    dx, dy = (xs - K.cx) / K.focal, -(ys - K.cy) / K.focal
    t = 4.0 / (1.0 - 2.0 * dx)                                # plane z = -4 - 2x, ray (dx, dy, -1) t
    expected = torch.stack([dx * t * 0.5 + 0.5, -dy * t * 0.5 + 0.5], -1)
    assert raster.mask.sum() > 1000
    assert (uv[raster.mask] - expected[raster.mask]).abs().max() < 1e-4
    texture = torch.zeros(2, 2, 4)
    texture[0, :, 0] = texture[1, :, 2] = texture[..., 3] = 1.0            # first texel row red, second blue
    image = render_albedo(corners, faces, uvs, texture, K, supersample=1).color
    top, bottom = image[:, 20, 32], image[:, 44, 32]
    assert top[0] > top[2] and bottom[2] > bottom[0]


def test_glb_mid_slice_projects_onto_the_crop():
    source = Intrinsics.from_hfov(640, 480, math.radians(50), shift_x=0.04, shift_y=-0.02)
    crop_cx, crop_cy, crop_size = 400.0, 180.0, 160.0
    crop = CropCamera.from_crop(source, crop_cx, crop_cy, crop_size)
    # The model cube's mid-depth slice, written in the GLB frame (x and z flip): model +x is image right.
    model = torch.tensor([[0.5, 0.5, 0.0], [0.5, -0.5, 0.0], [-0.5, -0.5, 0.0], [-0.5, 0.5, 0.0]])
    glb = model * torch.tensor([-1.0, 1.0, -1.0])
    m = torch.tensor(crop.glb_to_camera(), dtype=torch.float32)
    xy, _ = project(glb @ m[:3, :3].T + m[:3, 3], source)
    half = crop_size / 2
    expected = torch.tensor([[crop_cx + half, crop_cy - half], [crop_cx + half, crop_cy + half],
                             [crop_cx - half, crop_cy + half], [crop_cx - half, crop_cy - half]])
    assert torch.allclose(xy, expected, atol=1e-3)
    raster = rasterize(glb @ m[:3, :3].T + m[:3, 3], torch.tensor([[0, 1, 2], [0, 2, 3]]), source)
    rows, cols = raster.mask.nonzero().unbind(1)
    assert (int(cols.min()), int(cols.max()) + 1) == (crop_cx - half, crop_cx + half)
    assert (int(rows.min()), int(rows.max()) + 1) == (crop_cy - half, crop_cy + half)


# -- the whole evaluation -----------------------------------------------------------------------------------

class OracleGenerator:
    """Returns the ground truth of eval object `seed` itself (the flexible-dual-grid mesh of its posed SDF) with a
    flat grey texture, placed like a generation: in the GLB frame of the crop camera the service would use."""

    def __init__(self, seed: int, device: str = "cpu"):
        self.seed, self.device = seed, torch.device(device)     # the eval measures on the generator's device
        self.model = SimpleNamespace(default_options={"resolution": 256}, model_id="oracle", model_hash="0")

    def capabilities(self):
        return {"max_views": 1}

    def run(self, request, on_progress, should_cancel):
        field = make_object(self.seed).field("cpu")
        surface = surface_samples(field, 32).cpu().double().numpy()
        view = ProceduralDataset("eval", views_per_object=1).views(make_object(self.seed), surface)[0]
        vertices, faces = reconstruct_mesh_from_targets(shape_targets(PosedObject(field, view), 128))
        image = Image.open(io.BytesIO(request.views[0].image_png))
        crop = CropCamera.from_crop(request.views[0].camera.intrinsics(), *crop_geometry(image).center,
                                    crop_geometry(image).size)
        rig = MultiViewRig.from_views([crop], [request.views[0].camera.c2w])
        to_glb = np.linalg.inv(rig.glb_to_camera())
        camera_points = evaluation.model_to_camera(view, vertices.double()).numpy()
        glb = (camera_points @ to_glb[:3, :3].T + to_glb[:3, 3]).astype(np.float32)
        texture = np.full((4, 4, 4), 128, np.uint8)
        texture[..., 3] = 255
        asset = ExportedAsset(glb, faces.numpy().astype(np.uint32), np.zeros((len(glb), 2), np.float32),
                              np.zeros_like(glb), texture, texture[..., :3], None, "OPAQUE")
        return Generation(asset, rig, {})


@pytest.mark.slow
def test_oracle_scores_near_perfect_geometry(tmp_path):
    seed = seed_of("eval", 0)
    result = evaluation.evaluate(OracleGenerator(seed), [seed], EvalOptions(image_size=128, points=4000, out=tmp_path))
    o = result["objects"][0]
    assert o["iou"] > 0.97
    assert o["depth_scale"] == pytest.approx(1.0, abs=0.01)
    # 4000 points a side leave sampling gaps of ~0.007 on average: the floor of a perfect asset at this density.
    assert o["chamfer_full"] < 0.01 and o["chamfer_visible"] < 0.01
    assert o["f@0.05_full"] > 0.99 and o["f@0.05_visible"] > 0.99
    assert json.loads((tmp_path / "metrics.json").read_text())["objects"][0]["seed"] == seed
    assert (tmp_path / f"{seed}.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the eval's CUDA path needs a GPU")
def test_the_eval_measures_the_same_on_the_gpu_as_on_the_cpu():
    """Beside a CUDA model the ground truth, the renders and the nearest-neighbour search run on the GPU; the
    numbers are the CPU path's up to floating-point differences."""
    seed = seed_of("eval", 0)
    options = EvalOptions(image_size=128, points=4000)
    cpu, gpu = (evaluation.evaluate(OracleGenerator(seed, d), [seed], options)["objects"][0] for d in ("cpu", "cuda"))
    for key in evaluation.METRICS:
        assert gpu[key] == pytest.approx(cpu[key], rel=0.02, abs=0.005), key


def test_an_eval_object_the_server_would_reject_is_reported_not_averaged(tmp_path):
    """Held-out object 3 is made of see-through parts only (alpha 0.3-0.8): no pixel is more than 80% opaque, so
    the official crop has nothing to frame and the server rejects the image. The eval lists it with that error
    instead of stopping the whole run or averaging a made-up score."""
    seed = seed_of("eval", 3)
    result = evaluation.evaluate(OracleGenerator(seed), [seed], EvalOptions(image_size=128, points=4000, out=tmp_path))
    assert result["objects"] == [] and [r["seed"] for r in result["rejected"]] == [seed]
    assert "80% opaque" in result["rejected"][0]["error"] and math.isnan(result["mean"]["iou"])
    assert "not generated" in evaluation.table(result)


@pytest.mark.slow
def test_default_model_beats_its_measured_floor(tmp_path):
    """The shipped model on held-out object 0 with its default options. Measured on 2026-11-22 (BENCHMARKS.md,
    `pixal3d eval`, H200): IoU 0.927, F@0.05 visible 0.926, full 0.890; with this test's fewer surface samples and
    512² maps on a CPU: 0.927, 0.907, 0.884. The floors sit below them, well above what an unplaced or empty asset
    scores (IoU ~0, F-scores ~0), above the IoU of the same weights through the export's earlier remesh (0.873: its
    inner shells collapsed into holes when decimated), above the session-5 model's F-scores (0.643, 0.684) and the
    first shipped model (IoU 0.794, F@0.05 visible 0.302, full 0.383), which trained on whole renders instead of
    crop views."""
    from pixal3d_backend.loading import load_model
    options = EvalOptions(points=5000, generation={"face_target": 50_000, "texture_size": 512}, out=tmp_path)
    o = evaluation.evaluate(load_model(None), [seed_of("eval", 0)], options)["objects"][0]
    for key in ("iou", "ssim", "f@0.01_visible", "f@0.05_visible", "f@0.01_full", "f@0.05_full"):
        assert 0.0 <= o[key] <= 1.0, key
    for key in ("psnr", "chamfer_visible", "chamfer_full", "depth_scale"):
        assert math.isfinite(o[key]) and o[key] > 0, key
    assert o["iou"] > 0.88 and o["f@0.05_visible"] > 0.75 and o["f@0.05_full"] > 0.75
    assert (tmp_path / f"{seed_of('eval', 0)}.png").is_file()


@pytest.mark.slow
def test_orbit_cameras_see_the_object_where_their_renders_do():
    """The protocol cameras of `pixal3d eval --views K` (view 0's world, its model frame possibly translated) put
    the object exactly where each orbit view's own render shows it."""
    from pixal3d_backend.camera import R_MODEL_TO_WORLD
    from pixal3d_backend.data import render_views

    obj = make_object(seed_of("eval", 1))
    field = obj.field("cpu")
    surface = surface_samples(field, 32).cpu().double().numpy()
    main = ProceduralDataset("eval", views_per_object=1).views(obj, surface)[0]
    views = [main] + [evaluation.orbit_view(main, surface, a) for a in (math.pi / 2, math.pi)]
    size = 48
    masks = render_views(field, views, size, 1).rgba[:, 3].numpy() > 0.5
    world = (main.scale * surface @ main.rotation.T + main.translation) @ R_MODEL_TO_WORLD.T / main.mesh_scale
    for view, mask in zip(views, masks):
        c2w = evaluation.camera_to_world(main, view)
        local = world @ np.linalg.inv(c2w)[:3, :3].T + np.linalg.inv(c2w)[:3, 3]
        k = evaluation.intrinsics_of(view, size)
        px = np.floor(k.focal * local[:, 0] / -local[:, 2] + k.cx).astype(int)
        py = np.floor(-k.focal * local[:, 1] / -local[:, 2] + k.cy).astype(int)
        inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        assert inside.mean() > 0.99
        assert mask[py[inside], px[inside]].mean() > 0.97

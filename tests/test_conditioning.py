"""Image conditioning beyond the parity fixtures: sparse vs dense lifting, the projection against its closed
form, neighbourhood attention against a brute-force reference, multi-view fusion, input validation."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pixal3d_backend.camera import ViewCamera, front_view_c2w, rebase_view
from pixal3d_backend.conditioning.naf import neighborhood_attention_2d, neighborhood_indices
from pixal3d_backend.conditioning.preprocess import crop_geometry, preprocess_image
from pixal3d_backend.conditioning.proj_grid import (ProjGrid, dense_grid_coords, lift_features,
                                                    lift_features_multiview, project_voxels)


def random_coords(R, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(R ** 3, generator=g)[:n].reshape(-1, 1).div(torch.tensor([R * R, R, 1]),
                                                                       rounding_mode="floor") % R


# ---------------------------------------------------------------------------------------------------------
# back-projection
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["BHWC", "BCHW"])
def test_sparse_lift_equals_dense_proj_grid_at_coords(layout):
    R, S = 12, 64
    fmap = torch.randn(2, 5, 7, 7)
    fov, dist, ms = torch.tensor([0.7, 0.4]), torch.tensor([1.2, 2.5]), torch.tensor([1.0, 0.8])
    dense = ProjGrid(R, S)(fmap, fov, dist, ms, layout=layout)                       # [2, R^3, C]
    coords = random_coords(R, 100)
    sparse = lift_features(fmap, coords, R, S, fov, dist, ms, layout=layout)
    flat = coords[:, 0] * R * R + coords[:, 1] * R + coords[:, 2]
    torch.testing.assert_close(sparse, dense[:, flat], rtol=0, atol=0)


def test_dense_coords_follow_official_token_order():
    R = 5
    coords = dense_grid_coords(R)
    k = 2 * R * R + 3 * R + 4
    assert coords[k].tolist() == [2, 3, 4]


def pixel_coordinate_map(S):
    """[1, 2, S, S]: channel 0 holds the pixel's column index, channel 1 its row index (bilinear sampling at
    continuous pixel position p then returns p itself)."""
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xs, ys])[None]


@pytest.mark.parametrize("fov,ms", [(0.8575560450553894, 1.0), (0.35, 0.8)])
def test_lifted_pixel_equals_closed_form_projection(fov, ms):
    R, S = 16, 128
    d = 0.5 / (ms * math.tan(fov / 2)) * 1.2
    coords = dense_grid_coords(R)
    sampled = lift_features(pixel_coordinate_map(S), coords, R, S, fov, d, ms)[0]   # [R^3, 2] = (u, v)
    # Spec §2.2 closed form in the model frame: x_v = -0.5 + i / (R - 1), camera at +z_v.
    x, y, z = (-0.5 + coords.double() / (R - 1)).unbind(-1)
    f = S / (2 * math.tan(fov / 2))
    u = f * x / (ms * d - z) + S / 2
    v = -f * y / (ms * d - z) + S / 2
    inside = (u > 0) & (u < S - 1) & (v > 0) & (v < S - 1)                           # no border clamping
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(sampled[inside, 0].double(), u[inside], rtol=0, atol=2e-3)
    torch.testing.assert_close(sampled[inside, 1].double(), v[inside], rtol=0, atol=2e-3)


def test_projection_orientation():
    """+x_v goes right, +y_v goes up in the image, the camera sits on +z_v."""
    R, S = 3, 100
    coords = torch.tensor([[1, 1, 1], [2, 1, 1], [1, 2, 1], [1, 1, 2]])
    p = project_voxels(coords, R, S, 0.8, 2.0)
    centre, right, up, near = p.uv[0]
    assert torch.allclose(centre, torch.tensor([S / 2, S / 2]))
    assert right[0] > centre[0] and up[1] < centre[1]
    assert p.depth[0, 3] < p.depth[0, 0]
    assert p.visible.all()


def test_explicit_front_view_c2w_equals_distance():
    R, S = 6, 32
    fmap, coords = torch.randn(1, 3, 8, 8), dense_grid_coords(R)
    a = lift_features(fmap, coords, R, S, 0.6, distance=1.7)
    b = lift_features(fmap, coords, R, S, 0.6, c2w=front_view_c2w(1.7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_camera_arguments_are_validated():
    fmap, coords = torch.randn(2, 3, 8, 8), dense_grid_coords(4)
    with pytest.raises(ValueError, match="exactly one"):
        lift_features(fmap, coords, 4, 32, 0.6)
    with pytest.raises(ValueError, match="camera values"):
        lift_features(fmap, coords, 4, 32, [0.6, 0.5, 0.4], distance=1.0)
    with pytest.raises(ValueError, match="layout"):
        lift_features(fmap, coords, 4, 32, 0.6, distance=1.0, layout="HWC")


# ---------------------------------------------------------------------------------------------------------
# multi-view
# ---------------------------------------------------------------------------------------------------------

def orbit_c2w(azimuth, distance):
    """Blender c2w of a camera orbiting the world Z axis, looking at the origin (azimuth 0 = front view)."""
    c, s = math.cos(azimuth), math.sin(azimuth)
    turn = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return turn @ front_view_c2w(distance)


def test_multiview_with_one_view_is_single_view():
    R, S, fov, d = 8, 64, 0.5, 2.2
    fmap, coords = torch.randn(1, 4, 16, 16), random_coords(R, 60)
    single = lift_features(fmap, coords, R, S, fov, d)[0]
    c2w = front_view_c2w(d)[None]
    mean = lift_features_multiview(fmap, coords, R, S, [fov], c2w, weighting="mean")
    torch.testing.assert_close(mean, single, rtol=0, atol=1e-6)
    # "visible" keeps what the view sees and zeroes the voxels outside its frustum (no border values).
    visible = project_voxels(coords, R, S, fov, d).visible[0]
    assert 0 < visible.sum() < len(coords)
    masked = lift_features_multiview(fmap, coords, R, S, [fov], c2w, weighting="visible")
    torch.testing.assert_close(masked, single * visible[:, None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighting", ["mean", "visible"])
def test_multiview_fusion_ignores_the_order_of_extra_views(weighting):
    R, S, d = 8, 64, 3.0
    views = [orbit_c2w(a, d) for a in (0.0, math.pi / 2, math.pi, 1.5 * math.pi)]
    rebased = np.stack([rebase_view(views[0], v) for v in views])
    fmaps, fovs, coords = torch.randn(4, 3, 16, 16), [0.4, 0.45, 0.5, 0.55], random_coords(R, 80)
    ref = lift_features_multiview(fmaps, coords, R, S, fovs, rebased, weighting=weighting)
    order = [0, 3, 1, 2]
    permuted = lift_features_multiview(fmaps[order], coords, R, S, [fovs[i] for i in order], rebased[order],
                                       weighting=weighting)
    torch.testing.assert_close(permuted, ref, rtol=0, atol=1e-6)


def test_visible_weighting_drops_views_that_cannot_see_the_voxel():
    R, S, fov, d = 8, 64, 1.2, 2.2                                   # view 0 sees the whole cube
    coords = random_coords(R, 50)
    assert project_voxels(coords, R, S, fov, d).visible.all()
    behind = front_view_c2w(d) @ np.diag([-1.0, 1.0, -1.0, 1.0])    # same position, turned to look away
    c2ws = np.stack([front_view_c2w(d), behind])
    fmaps = torch.randn(2, 4, 16, 16)
    single = lift_features(fmaps[:1], coords, R, S, fov, d)[0]
    fused = lift_features_multiview(fmaps, coords, R, S, [fov, fov], c2ws, weighting="visible")
    torch.testing.assert_close(fused, single, rtol=0, atol=1e-6)
    mean = lift_features_multiview(fmaps, coords, R, S, [fov, fov], c2ws, weighting="mean")
    assert not torch.allclose(mean, single)
    with pytest.raises(ValueError, match="weighting"):
        lift_features_multiview(fmaps, coords, R, S, [fov, fov], c2ws, weighting="max")


# ---------------------------------------------------------------------------------------------------------
# neighbourhood attention
# ---------------------------------------------------------------------------------------------------------

def natten_window_start(index, length, kernel, dilation):
    """NATTEN's own formulation of the window start (case analysis, not a clamp)."""
    half = kernel // 2
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue = index % dilation
        full = (length // dilation) * dilation
        extra = length - full
        if residue < extra:
            return length - extra + residue - 2 * half * dilation
        return full + residue - kernel * dilation
    return index - half * dilation


def brute_force_na2d(q, k, v, kernel, dilation):
    B, H, W, heads, D = q.shape
    out = torch.zeros(B, H, W, heads, v.shape[-1], dtype=torch.float64)
    for i in range(H):
        rows = [natten_window_start(i, H, kernel[0], dilation[0]) + a * dilation[0] for a in range(kernel[0])]
        for j in range(W):
            cols = [natten_window_start(j, W, kernel[1], dilation[1]) + b * dilation[1] for b in range(kernel[1])]
            kk = k[:, rows][:, :, cols].reshape(B, -1, heads, D)
            vv = v[:, rows][:, :, cols].reshape(B, -1, heads, v.shape[-1])
            w = (torch.einsum("bnd,bknd->bnk", q[:, i, j], kk) * D ** -0.5).softmax(-1)
            out[:, i, j] = torch.einsum("bnk,bknd->bnd", w, vv)
    return out


@pytest.mark.parametrize("shape,kernel,dilation", [
    ((11, 13), (3, 3), (1, 1)),
    ((11, 13), (3, 5), (2, 2)),      # 13 = 6*2 + 1: residue classes of different lengths
    ((14, 10), (3, 3), (4, 3)),      # windows shifted at both borders of every class
])
def test_neighborhood_attention_matches_brute_force(shape, kernel, dilation):
    g = torch.Generator().manual_seed(0)
    H, W = shape
    q, k = (torch.randn(2, H, W, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, H, W, 2, 3, generator=g, dtype=torch.float64)
    ref = brute_force_na2d(q, k, v, kernel, dilation)
    # A tiny budget forces one query row per chunk; the default processes everything at once.
    for budget in (1, 1 << 26):
        out = neighborhood_attention_2d(q, k, v, kernel, dilation, max_chunk_elements=budget)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_neighborhood_indices_stay_in_class_and_in_range():
    idx = neighborhood_indices(40, 9, 4)
    assert idx.min() >= 0 and idx.max() < 40
    assert ((idx % 4) == (torch.arange(40) % 4)[:, None]).all()
    assert (idx.unique(dim=1).shape[1] == 9)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_indices(30, 9, 4)


# ---------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------

def rgba_with_box(size, box, alpha=255):
    a = np.zeros((size[1], size[0], 4), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = (200, 100, 50, alpha)
    return Image.fromarray(a, "RGBA")


def test_crop_geometry_matches_the_crop():
    image = rgba_with_box((300, 200), (100, 40, 181, 161), alpha=230)   # bbox x 100..180, y 40..160
    geom = crop_geometry(image)
    out = preprocess_image(image)
    assert out.mode == "RGB" and out.size == (geom.box[2] - geom.box[0],) * 2
    assert geom.center == (140.0, 100.0)
    assert geom.size == 2 * (int(120 * 1.1) // 2) and geom.downscale == 1.0
    # rgb * alpha on black, truncated: 200 * 230/255 = 180.4 -> 180, ...; outside the object: black.
    assert np.asarray(out)[out.height // 2, out.width // 2].tolist() == [180, 90, 45]
    assert np.asarray(out)[0, 0].tolist() == [0, 0, 0]


def test_crop_geometry_is_in_input_pixels_after_downscale():
    image = rgba_with_box((2048, 1000), (1000, 300, 1401, 701))
    geom = crop_geometry(image)
    assert geom.downscale == pytest.approx(0.5)
    assert geom.center[0] == pytest.approx(1200, abs=2) and geom.center[1] == pytest.approx(500, abs=2)
    assert geom.size == pytest.approx(440, abs=4)
    assert preprocess_image(image).size == (round(geom.size * geom.downscale),) * 2


def test_preprocess_rejects_images_without_alpha():
    with pytest.raises(ValueError, match="image has no alpha mask"):
        preprocess_image(Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="image has no alpha mask"):
        preprocess_image(Image.new("RGBA", (64, 64), (10, 20, 30, 255)))
    with pytest.raises(ValueError, match="empty"):
        preprocess_image(rgba_with_box((64, 64), (10, 10, 30, 30), alpha=150))
    with pytest.raises(TypeError):
        preprocess_image(np.zeros((8, 8, 4), np.uint8))


# ---------------------------------------------------------------------------------------------------------
# extractor: encode once, lift sparse
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["dino_proj_extractor_lr",
                                     pytest.param("dino_proj_extractor_naf", marks=pytest.mark.slow)])
def test_extractor_sparse_lift_equals_dense_forward(parity_dir, fixture):
    from pixal3d_backend.conditioning.image_encoder import DinoV3ProjFeatureExtractor
    torch.manual_seed(0)
    ext = DinoV3ProjFeatureExtractor(**json.loads((parity_dir / f"{fixture}.json").read_text())["args"]).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 90, 3), dtype=np.uint8))
    R, cam = ext.grid_resolution, ViewCamera(fov=0.7, distance=1.3, mesh_scale=0.9)
    with torch.no_grad():
        glob, dense = ext([image], cam.fov, cam.distance, cam.mesh_scale)
    cache = {}
    encoded = ext.encode([image], cache)
    coords = random_coords(R, 40)
    sparse = ext.lift(encoded, coords, R, cam)
    assert sparse.shape == (40, (2 if ext.use_naf_upsample else 1) * ext.model.config.hidden_size)
    flat = coords[:, 0] * R * R + coords[:, 1] * R + coords[:, 2]
    torch.testing.assert_close(sparse, dense[0, flat], rtol=0, atol=0)
    torch.testing.assert_close(encoded.global_tokens, glob, rtol=0, atol=0)
    # One view through the multi-view path is the single-view lift.
    torch.testing.assert_close(ext.lift_multiview(encoded, coords, R, [cam]), sparse, rtol=0, atol=1e-6)
    # A second encode of the same image by an extractor sharing the backbone reuses the DINOv3 tokens.
    assert len(cache) == 1
    ext.encode([image], cache)
    assert len(cache) == 1

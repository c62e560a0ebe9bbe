"""Multi-view geometry (issue 6): several source cameras, each cropped around the object, conditioning view 0's
model frame (`camera.MultiViewRig`), checked against the pinhole projection written out by hand, the official
re-basing formula and the single-view path."""
import math

import numpy as np
import pytest
import torch

from pixal3d_backend.camera import CropCamera, Intrinsics, MultiViewRig, ViewCamera, rebase_view
from pixal3d_backend.conditioning.proj_grid import (camera_to_world, dense_grid_coords, lift_features_multiview,
                                                    project_voxels)
from camera_rigs import look_at_c2w

S = 512          # conditioning image side
R = 9            # voxel grid: coords map to model points linspace(-1, 1, R) / 2


def pixel(source: Intrinsics, c2w: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Where a source camera sees world points [N, 3]: pixels (x right, y down), by hand."""
    local = (np.linalg.inv(c2w) @ np.c_[world, np.ones(len(world))].T).T[:, :3]
    depth = -local[:, 2]
    return np.stack([source.focal * local[:, 0] / depth + source.cx,
                     -source.focal * local[:, 1] / depth + source.cy], axis=1)


class View:
    """A source camera with its image intrinsics and an off-centre square crop around the object."""

    def __init__(self, c2w, width, height, hfov, crop_centre, crop_size, shift=(0.0, 0.0)):
        self.c2w = c2w
        self.source = Intrinsics.from_hfov(width, height, hfov, *shift)
        self.crop_centre, self.crop_size = np.asarray(crop_centre, float), crop_size
        self.crop = CropCamera.from_crop(self.source, *crop_centre, crop_size)

    def crop_pixel(self, world: np.ndarray) -> np.ndarray:
        """The point's pixel in the crop resized to S x S."""
        return (pixel(self.source, self.c2w, world) - (self.crop_centre - self.crop_size / 2)) * S / self.crop_size


def object_centred_views(centre=(0.3, -0.2, 0.5), radius=0.5) -> list[View]:
    """Four cameras of different images, lenses and positions around a ball of `radius` at `centre`; each crop is
    the square around the ball's image, so the crops are off-centre (sheared) for the three shifted or turned
    cameras."""
    centre = np.asarray(centre)
    rigs = [((0.0, -6.0, 1.5), (640, 480), 0.6, (0.05, 0.0), (0.0, 0.0, 0.0)),
            ((5.0, 1.0, 2.5), (480, 480), 0.8, (0.0, 0.0), (0.4, 0.0, 0.0)),
            ((-4.0, 3.0, 0.5), (800, 600), 0.5, (-0.1, 0.05), (0.0, 0.0, 0.3)),
            ((0.5, 6.5, -1.0), (500, 700), 0.7, (0.0, 0.0), (0.0, -0.2, 0.0))]
    views = []
    for position, (w, h), hfov, shift, aim_off in rigs:
        c2w = look_at_c2w(np.asarray(position) + centre, centre + np.asarray(aim_off))
        source = Intrinsics.from_hfov(w, h, hfov, *shift)
        local = np.linalg.inv(c2w) @ np.append(centre, 1.0)
        depth = -local[2]
        at = np.array([source.focal * local[0] / depth + source.cx, -source.focal * local[1] / depth + source.cy])
        size = 1.1 * 2 * radius * source.focal / depth          # the ball's image with the official margin
        views.append(View(c2w, w, h, hfov, at, size, shift))
    return views


def model_to_world(rig: MultiViewRig, model: np.ndarray) -> np.ndarray:
    """Model-frame points -> world, through view 0's crop and the rig's scale (what the placement does)."""
    to_camera = np.diag([rig.scale] * 3 + [1.0]) @ rig.crops[0].model_to_camera()
    return (rig.c2ws[0] @ to_camera @ np.c_[model, np.ones(len(model))].T).T[:, :3]


def grid_model_points(coords: torch.Tensor) -> np.ndarray:
    return (np.linspace(-1.0, 1.0, R)[coords.numpy()] / 2).astype(np.float64)


def rig_of(views) -> MultiViewRig:
    return MultiViewRig.from_views([v.crop for v in views], [v.c2w for v in views])


def test_the_object_centre_and_scale_come_from_where_the_crops_rays_meet():
    centre = np.array([0.3, -0.2, 0.5])
    views = object_centred_views(centre)
    rig = rig_of(views)
    depth = -(np.linalg.inv(views[0].c2w) @ np.append(centre, 1.0))[2]
    assert rig.scale == pytest.approx(depth / views[0].crop.distance, rel=1e-9)
    # The model origin lands on the ball's centre, in scene units (the placement of the result).
    placed = views[0].c2w @ rig.glb_to_camera() @ np.array([0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(placed[:3], centre, atol=1e-9)


def test_voxel_features_from_n_cameras_equal_each_views_own_projection():
    """Analytic check: every voxel projects, in each view's conditioning camera, to the pixel of that view's crop
    where its source camera sees the voxel's world point; the fused feature is the mean of those samples."""
    views = object_centred_views()
    rig = rig_of(views)
    coords = dense_grid_coords(R)
    world = model_to_world(rig, grid_model_points(coords))
    cameras = rig.grid_cameras()
    for view, cam in zip(views, cameras):
        projection = project_voxels(coords, R, S, cam.fov, cam.distance, cam.mesh_scale, cam.c2w)
        np.testing.assert_allclose(projection.uv[0].double().numpy(), view.crop_pixel(world), atol=2e-3)
    # Feature maps linear in the pixel position: bilinear sampling returns the position exactly.
    side = 32
    ramp = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    fmaps = torch.stack([torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side)])
                         * (1.0 + k) for k in range(len(views))])
    fused = lift_features_multiview(fmaps, coords, R, S, [c.fov for c in cameras],
                                    np.stack([camera_to_world(c) for c in cameras]), [c.mesh_scale for c in cameras])
    pixels = [view.crop_pixel(world) for view in views]
    expected = np.mean([(p + 0.5) / S * (1.0 + k) for k, p in enumerate(pixels)], axis=0)
    # Bilinear sampling reproduces the ramp between the map's outer pixel centres; outside them it clamps.
    margin = S / side / 2
    inside = np.all([((p + 0.5 >= margin) & (p + 0.5 <= S - margin)).all(1) for p in pixels], axis=0)
    assert inside.sum() > 100
    np.testing.assert_allclose(fused.double().numpy()[inside], expected[inside], atol=1e-5)


def test_centred_crops_reduce_to_the_official_rebasing():
    """The official rig: cameras looking at the origin, whole square frames as crops (no shear) -> every view's
    camera is `F(d0) @ inv(C0) @ C_i` (spec §3.2), view 0 the front view at d0 = |C0 translation|."""
    distance, fov = 1.1 * 0.5 / math.tan(math.radians(10)), math.radians(20)
    c2ws = [look_at_c2w((distance * math.sin(a), -distance * math.cos(a), 0.0)) for a in np.radians([0, 90, 180, 270])]
    source = Intrinsics.from_hfov(512, 512, fov)
    crops = [CropCamera.from_crop(source, 256.0, 256.0, 512.0)] * 4
    rig = MultiViewRig.from_views(crops, c2ws)
    cameras = rig.grid_cameras()
    assert cameras[0].c2w is None and cameras[0].distance == pytest.approx(distance, rel=1e-12)
    for cam, c2w in zip(cameras[1:], c2ws[1:]):
        np.testing.assert_allclose(cam.c2w, rebase_view(c2ws[0], c2w), atol=1e-12)
    # The grid's mesh_scale: the crop's model cube in scene units (the official release leaves it at 1 and frames
    # the object with the rig's distance instead).
    assert cameras[0].mesh_scale == pytest.approx(crops[0].distance / distance, rel=1e-12)


def test_one_view_is_exactly_the_single_view_camera():
    view = object_centred_views()[2]
    rig = rig_of([view])
    assert rig.scale == 1.0
    assert rig.grid_cameras() == [ViewCamera(view.crop.fov, distance=view.crop.distance, mesh_scale=1.0)]
    np.testing.assert_array_equal(rig.glb_to_camera(), view.crop.glb_to_camera())


def test_the_order_of_the_views_after_view_0_does_not_change_the_fused_features():
    views = object_centred_views()
    coords = dense_grid_coords(R)
    fmaps = torch.randn(4, 6, 16, 16, generator=torch.Generator().manual_seed(3))

    def fused(order, weighting):
        cameras = rig_of([views[i] for i in order]).grid_cameras()
        c2ws = np.stack([camera_to_world(c) for c in cameras])
        return lift_features_multiview(fmaps[list(order)], coords, R, S, [c.fov for c in cameras], c2ws,
                                       [c.mesh_scale for c in cameras], weighting)

    for weighting in ("mean", "visible"):
        torch.testing.assert_close(fused((0, 3, 1, 2), weighting), fused((0, 1, 2, 3), weighting),
                                   rtol=0, atol=1e-5)


def test_cameras_from_one_direction_are_refused_in_plain_words():
    views = object_centred_views()
    twin = View(views[0].c2w @ np.array([[1, 0, 0, 0.01], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
                640, 480, 0.6, views[0].crop_centre, views[0].crop_size, (0.05, 0.0))
    with pytest.raises(ValueError, match="same direction"):
        rig_of([views[0], twin])


def _ball_seen_by_four_views(centre=np.array([0.3, -0.2, 0.5]), radius=0.5, size=64):
    """(rig, silhouettes [4, 1, size, size], all 32^3 coords, distance of a token's centre from the ball's centre,
    one token's width) for a ball filmed by four object-centred views."""
    from pixal3d_backend.pipeline import SS_RESOLUTION
    views = object_centred_views(tuple(centre), radius)
    rig = rig_of(views)
    rng = np.random.default_rng(0)
    ball = rng.normal(size=(200_000, 3))
    ball = centre + radius * ball / np.linalg.norm(ball, axis=1, keepdims=True) * rng.random((len(ball), 1)) ** (1 / 3)
    masks = torch.zeros(len(views), 1, size, size)
    for v, view in enumerate(views):
        px = np.floor(view.crop_pixel(ball) * size / S).astype(int)
        ok = ((px >= 0) & (px < size)).all(1)
        masks[v, 0, px[ok, 1], px[ok, 0]] = 1.0
    r = SS_RESOLUTION
    grid = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(grid), 1, dtype=torch.int32), grid.int()], 1)
    world = lambda c: model_to_world(rig, np.linspace(-1.0, 1.0, r)[c[:, 1:].numpy()] / 2)
    distance = lambda c: np.linalg.norm(world(c) - centre, axis=1)
    token = np.linalg.norm(world(coords[:1] + torch.tensor([[0, 1, 0, 0]], dtype=torch.int32)) - world(coords[:1]))
    return rig, masks, coords, distance, token


def test_visual_hull_carving_keeps_the_object_and_removes_what_no_view_sees():
    """'hull' fusion (single-view weights): sparse-structure tokens outside any view's silhouette go, every token
    of the object stays (the silhouettes are dilated by a token)."""
    from pixal3d_backend.pipeline import carve_visual_hull
    radius = 0.5
    rig, masks, coords, distance, token = _ball_seen_by_four_views(radius=radius)
    kept = carve_visual_hull(coords, masks, rig.grid_cameras())
    assert set(map(tuple, coords[distance(coords) < radius].tolist())) <= set(map(tuple, kept.tolist()))
    assert distance(kept).max() < 1.5 * radius + 2 * token      # the hull of four views of a ball, plus dilation
    assert len(kept) < 0.6 * len(coords)          # the ball fills ~40 % of the model cube (its crop is 1.1x it)


def test_visual_hull_shell_is_the_surface_layer_of_the_hull():
    """'hull' fusion also adds the hull's surface tokens: a closed one-token-thick layer around the ball, none
    deep inside it, none outside the hull."""
    from pixal3d_backend.pipeline import inside_every_view, visual_hull_shell
    radius = 0.5
    rig, masks, coords, distance, token = _ball_seen_by_four_views(radius=radius)
    shell = visual_hull_shell(masks, rig.grid_cameras())
    hull = coords[inside_every_view(coords, masks, rig.grid_cameras())]
    assert set(map(tuple, shell.tolist())) <= set(map(tuple, hull.tolist()))
    assert distance(shell).min() > radius - 2 * token                  # a layer, not the solid
    assert len(hull) > 3 * len(shell) > 0
    # closed: every hull token's straight path out along +x crosses the shell
    hull_set, shell_set = set(map(tuple, hull.tolist())), set(map(tuple, shell.tolist()))
    for b, x, y, z in hull.tolist()[::37]:
        path = [(b, xi, y, z) for xi in range(x, 32) if (b, xi, y, z) in hull_set]
        assert any(p in shell_set for p in path)

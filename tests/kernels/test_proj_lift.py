"""Projection lifting: the fused Triton kernel (projection + bilinear border sampling + fusion over views) against
the plain-PyTorch reference on fresh random cameras, maps and points, in every fusion mode and both map layouts
(on CPU through Triton's interpreter, on CUDA for real). Tolerances as stated in `pixal3d_kernels.proj_lift`."""
import math

import pytest
import torch

from pixal3d_kernels import proj_lift

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def look_at_origin_w2c(azimuth: float, elevation: float, distance: float) -> torch.Tensor:
    """World-to-camera of a camera on a sphere around the origin looking at it (camera looks along -z, +y up)."""
    eye = distance * torch.tensor([math.cos(elevation) * math.sin(azimuth), -math.cos(elevation) * math.cos(azimuth),
                                   math.sin(elevation)], dtype=torch.float64)
    back = eye / eye.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, eye
    return torch.linalg.inv(c2w.float())


def random_views(seed: int, views: int, image_size: int):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(views, 4, generator=g)
    w2c = torch.stack([look_at_origin_w2c(a * 2 * math.pi, (e - 0.5) * 1.2, 1.0 + 1.5 * d)
                       for a, e, d, _ in r.tolist()])
    w2c[-1] = w2c[-1] @ torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0]))   # a view turned away from the object
    fov = 0.4 + r[:, 3] * 0.8
    focal = image_size / 2 / torch.tan(fov / 2)
    mesh_scale = 0.8 + 0.4 * torch.rand(views, generator=g)
    points = torch.rand(300, 3, generator=g) * 2.4 - 1.2                    # some outside every image
    return points.to(DEVICE), mesh_scale.to(DEVICE), w2c.to(DEVICE), focal.to(DEVICE)


@pytest.mark.parametrize("reduce", ["none", "mean", "visible"])
@pytest.mark.parametrize("layout", ["BCHW", "BHWC"])
def test_lift_kernel_matches_reference(triton_kernels, reduce, layout):
    views, channels, side, image_size = 3, 40, 16, 64
    points, mesh_scale, w2c, focal = random_views(len(reduce) + len(layout), views, image_size)
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(views, side, side, channels, generator=g).to(DEVICE)
    fmaps = maps.permute(0, 3, 1, 2) if layout == "BHWC" else maps.permute(0, 3, 1, 2).contiguous()
    ref = proj_lift.lift_reference(fmaps, points, mesh_scale, w2c, focal, image_size, reduce)
    out = proj_lift.lift(fmaps, points, mesh_scale, w2c, focal, image_size, reduce)
    uv, depth = proj_lift.project(points, mesh_scale, w2c, focal, image_size)
    seen = proj_lift.visible(uv, depth, image_size)
    assert 0.1 < seen.float().mean() < 0.9 and not seen[-1].all()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="half-precision grid_sample needs CUDA")
def test_lift_kernel_matches_reference_in_half_precision(triton_kernels):
    views, channels, side, image_size = 2, 64, 32, 128
    points, mesh_scale, w2c, focal = random_views(3, views, image_size)
    fmaps = torch.randn(views, channels, side, side, device=DEVICE).half()
    ref = proj_lift.lift_reference(fmaps, points, mesh_scale, w2c, focal, image_size, "mean")
    out = proj_lift.lift(fmaps, points, mesh_scale, w2c, focal, image_size, "mean")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_reference_samples_the_pixel_under_the_projected_point():
    """A map holding each pixel's own (column, row) returns the projected position, half-pixel convention
    included, wherever the point is inside the map's interior."""
    image_size = 32
    ys, xs = torch.meshgrid(torch.arange(image_size, dtype=torch.float32),
                            torch.arange(image_size, dtype=torch.float32), indexing="ij")
    fmaps = torch.stack([xs, ys])[None]
    points, mesh_scale, w2c, focal = (t.cpu() for t in random_views(0, 1, image_size))
    uv, _ = proj_lift.project(points, mesh_scale, w2c, focal, image_size)
    out = proj_lift.lift_reference(fmaps, points, mesh_scale, w2c, focal, image_size, "none")[0]
    interior = ((uv[0] > 0) & (uv[0] < image_size - 1)).all(-1)
    assert interior.sum() > 20
    torch.testing.assert_close(out[interior], uv[0][interior], rtol=0, atol=1e-4)

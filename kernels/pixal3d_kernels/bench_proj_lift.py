"""`python -m pixal3d_kernels.bench_proj_lift`: projection lifting, reference vs the fused Triton kernel.

Cases at the sizes of the 1024 cascade (DINOv3 ViT-L, 1024 channels): the sparse-structure stage's 16³ dense tokens
from the 32² patch map of a 512 image; the HR stage's ~20 k active tokens from the 64² patch map (channels-last,
read in place) and from the NAF map at 512² (channels-first), with one view and fused over 4 views. The Triton
row records its max abs error against the reference. `--quick`: small sizes, a CPU smoke run.
"""
from __future__ import annotations

import math

import torch

from . import benchmark
from .proj_lift import lift, lift_reference

# (name, voxels, views, map side, channels, layout, image size)
CASES = [("ss 16^3", 4096, 1, 32, 1024, "BHWC", 512),
         ("hr patch", 20_000, 1, 64, 1024, "BHWC", 1024),
         ("hr patch 4 views", 20_000, 4, 64, 1024, "BHWC", 1024),
         ("hr NAF 512^2", 20_000, 1, 512, 1024, "BCHW", 1024),
         ("hr NAF 512^2 4 views", 20_000, 4, 512, 1024, "BCHW", 1024)]
QUICK_CASES = [("quick", 500, 2, 16, 64, "BHWC", 64)]


def orbit_views(views: int, image_size: int, device: torch.device):
    """(mesh scales, world-to-camera, focal lengths) of cameras around the world Z axis at distance 3 looking at
    the origin with a 20 degree FOV, the official multi-view rig; view 0 is the front view."""
    w2c = []
    for k in range(views):
        a = 2 * math.pi * k / views
        back = torch.tensor([math.sin(a), -math.cos(a), 0.0])
        right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
        c2w = torch.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, torch.linalg.cross(back, right), back, 3 * back
        w2c.append(torch.linalg.inv(c2w))
    focal = torch.full((views,), image_size / 2 / math.tan(math.radians(20) / 2))
    return torch.ones(views, device=device), torch.stack(w2c).to(device), focal.to(device)


def main(argv: list[str] | None = None) -> None:
    args, device, dtype, run_triton = benchmark.parse_args(__doc__.split("\n\n")[0], argv)
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, voxels, views, side, channels, layout, image_size in QUICK_CASES if args.quick else CASES:
        points = (torch.rand(voxels, 3, generator=g) * 2 - 1).to(device)
        scale, w2c, focal = orbit_views(views, image_size, device)
        maps = torch.randn(views, side, side, channels, generator=g).to(device, dtype)
        fmaps = maps.permute(0, 3, 1, 2) if layout == "BHWC" else maps.permute(0, 3, 1, 2).contiguous()
        reduce = "none" if views == 1 else "mean"
        case = f"{name} ({voxels} vox)"
        with torch.no_grad():
            ref = lift_reference(fmaps, points, scale, w2c, focal, image_size, reduce)
            rows.append({"kernel": "proj_lift", "case": case, "impl": "reference", "ms": benchmark.time_ms(
                lambda: lift_reference(fmaps, points, scale, w2c, focal, image_size, reduce), device)})
            if run_triton:
                out = lift(fmaps, points, scale, w2c, focal, image_size, reduce)
                rows.append({"kernel": "proj_lift", "case": case, "impl": "triton", "ms": benchmark.time_ms(
                    lambda: lift(fmaps, points, scale, w2c, focal, image_size, reduce), device),
                    "max_abs_err": float((out.float() - ref.float()).abs().max())})
    benchmark.report(rows, device, args.json)


if __name__ == "__main__":
    main()

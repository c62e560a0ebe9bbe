"""Export of a full-size decode, step by step: `python -m pixal3d_kernels.bench_export [--json out.json]`.

The decode is what the shape and texture decoders produce at `--resolution` (default 1024): the flexible-dual-grid
targets of a procedural object (`data.shape_targets`: its surface voxels, dual vertices, edge flags and split
weights, ~3-5 M voxels at 1024) meshed by the product's own mesher and wound outward, with the object's PBR
attributes per voxel. It is exported to each `--case FACES:TEXTURE` (default 100 k faces with 2048² maps, then
1 M with 4096²) with the `--unwrap` method (default charts), with `export_asset`'s own per-step timings and the
UV layout's charts and atlas utilisation (the share of the atlas under triangles), after a warm-up export at a
small size that compiles the kernels. Then the two bake kernels run side by side with their references on the
last case's UV layout. The JSON is rewritten after every step, so a run stopped by a time limit keeps what it
measured.

Needs the backend's export dependencies (xatlas, fast_simplification, trimesh) on the path.
"""
from __future__ import annotations

import json
import time
from typing import get_args

import numpy as np
import torch

from . import benchmark
from .uv_raster import (rasterize_uv, rasterize_uv_reference, sample_voxel_field, sample_voxel_field_reference,
                        voxel_keys)


def full_size_decode(resolution: int, seed: int, device: torch.device):
    """(mesh wound outward, per-voxel PBR attributes) of procedural object `seed` decoded at `resolution`."""
    from pixal3d_backend.data import (PosedObject, make_object, random_view, reconstruct_mesh_from_targets,
                                      shape_targets, surface_samples)
    from pixal3d_backend.mesh import VoxelMesh, orient_outward

    obj = make_object(seed, device=device)
    field = obj.field(device)
    view = random_view(surface_samples(field, 32).cpu().double().numpy(), np.random.default_rng(seed))
    targets = shape_targets(PosedObject(field, view), resolution)
    vertices, faces = reconstruct_mesh_from_targets(targets)
    return orient_outward(VoxelMesh(vertices, faces, targets.coords, targets.attributes, 1.0 / resolution))


def atlas_stats(uvs: np.ndarray, faces: np.ndarray) -> dict:
    """Charts (islands of faces joined by edges with shared UVs) and the share of the [0, 1]² atlas under
    triangles."""
    from pixal3d_backend.export.charts import components, face_pairs

    f = torch.as_tensor(faces.astype(np.int64))
    charts = components(f.shape[0], *face_pairs(f), torch.zeros(f.shape[0], dtype=torch.long))
    t = uvs[faces].astype(np.float64)
    (ax, ay), (bx, by) = (t[:, 1] - t[:, 0]).T, (t[:, 2] - t[:, 0]).T
    twice_area = ax * by - ay * bx
    return {"charts": int(charts.max()) + 1, "utilisation": round(float(np.abs(twice_area).sum() / 2), 4)}


def parse_case(text: str) -> tuple[int, int]:
    faces, size = text.split(":")
    return int(float(faces)), int(size)


def main() -> None:
    from pixal3d_backend.export.unwrap import UnwrapMethod

    p = benchmark.parser(__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", action="append", type=parse_case,
                   help="FACES:TEXTURE, repeatable (default 1e5:2048 and 1e6:4096)")
    p.add_argument("--unwrap", default="charts", choices=get_args(UnwrapMethod), help="UV unwrap method")
    args = p.parse_args()
    from pixal3d_backend.camera import R_MODEL_TO_GLB
    from pixal3d_backend.export import ExportOptions, export_asset

    device = torch.device(args.device)
    resolution = 128 if args.quick else args.resolution
    cases = args.case or ([(20_000, 1024)] if args.quick else [(100_000, 2048), (1_000_000, 4096)])

    result = {"hardware": benchmark.hardware(device), "torch": torch.__version__, "unwrap": args.unwrap}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    clock = time.perf_counter()
    mesh = full_size_decode(resolution, args.seed, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    decode = {"resolution": resolution, "seed": args.seed, "voxels": int(mesh.coords.shape[0]),
              "faces": int(mesh.faces.shape[0]), "build_s": round(time.perf_counter() - clock, 2)}
    print(f"# decode at {resolution}: {decode['voxels']:,} voxels, {decode['faces']:,} faces "
          f"(built in {decode['build_s']} s)")
    result["decode"] = decode
    save()

    def export(face_target: int, texture_size: int):
        options = ExportOptions(face_target=face_target, texture_size=texture_size, unwrap=args.unwrap)
        start = time.perf_counter()
        asset = export_asset(mesh.vertices, mesh.faces, mesh.coords, mesh.attrs, resolution, options, device)
        return asset, time.perf_counter() - start

    export(10_000, 512)                                     # warm-up: kernel compilation, allocator, caches
    rows, asset = result.setdefault("exports", []), None
    for face_target, texture_size in cases:
        asset, total = export(face_target, texture_size)
        layout = atlas_stats(asset.uvs, asset.faces)
        row = {"face_target": face_target, "texture_size": texture_size, "faces": int(asset.faces.shape[0]),
               "total_s": round(total, 3), **{k: round(v, 3) for k, v in asset.timings.items()}, **layout}
        rows.append(row)
        steps = ", ".join(f"{k} {v:.2f}" for k, v in asset.timings.items())
        print(f"export {face_target:>9,} faces {texture_size}²: {total:7.2f} s  ({steps}; {args.unwrap}: "
              f"{layout['charts']} charts, {layout['utilisation']:.0%} of the atlas)", flush=True)
        save()

    # the bake kernels side by side with their references, on the last layout
    size = cases[-1][1]
    uvs = torch.as_tensor(asset.uvs, device=device)
    faces = torch.as_tensor(asset.faces.astype(np.int64), device=device)
    keys, order = torch.sort(voxel_keys(mesh.coords.to(device), resolution))
    values = mesh.attrs.to(device)[order].float().contiguous()
    owner, bary = rasterize_uv(uvs, faces, size)
    covered = torch.nonzero(owner.reshape(-1) >= 0)[:, 0]
    glb_to_model = torch.as_tensor(R_MODEL_TO_GLB, dtype=torch.float32, device=device)   # a rotation: inverse = T
    positions = torch.as_tensor(asset.positions, device=device) @ glb_to_model
    points = (positions[faces[owner.reshape(-1)[covered]]] * bary.reshape(-1, 3)[covered, :, None]).sum(1)
    case = f"{asset.faces.shape[0]} tris {size}²"
    kernel_rows = result.setdefault("kernels", [])
    for impl, raster, sample in (("reference", rasterize_uv_reference, sample_voxel_field_reference),
                                 ("triton", rasterize_uv, sample_voxel_field)):
        if impl == "triton" and device.type != "cuda":
            continue
        kernel_rows.append({"kernel": "uv_raster", "case": case, "impl": impl,
                            "ms": benchmark.time_ms(lambda: raster(uvs, faces, size), device, 1, 3)})
        kernel_rows.append({"kernel": "voxel_sample", "case": f"{points.shape[0]} texels", "impl": impl,
                            "ms": benchmark.time_ms(lambda: sample(keys, values, resolution, points), device, 1, 3)})
        save()
    benchmark.report(kernel_rows, device, None)


if __name__ == "__main__":
    main()

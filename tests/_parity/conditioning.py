"""Parity runners for image conditioning (fixture kinds preprocess_image, distance_from_fov, proj_grid, naf,
dino_extractor), mirroring the calling conventions of the official harness (`harness/ref_adapter.py`)."""
import numpy as np
import torch
from PIL import Image

from pixal3d_backend.camera import distance_from_fov
from pixal3d_backend.conditioning.preprocess import preprocess_image
from pixal3d_backend.conditioning.proj_grid import dense_grid_coords, project_voxels, world_grid_points


def run_preprocess_image(model, inp, meta):
    out = {}
    for key in sorted(inp):                       # rgba{i}_u8 -> rgb{i}_u8
        index = key[len("rgba"):-len("_u8")]
        rgb = preprocess_image(Image.fromarray(inp[key].numpy(), "RGBA"))
        out[f"rgb{index}_u8"] = torch.from_numpy(np.array(rgb))
    return out


def run_distance_from_fov(model, inp, meta):
    rows = zip(inp["fov"].tolist(), inp["extend_pixel"].tolist(), inp["mesh_scale"].tolist(),
               inp["image_resolution"].tolist())
    distance, focal = zip(*(distance_from_fov(*row) for row in rows))
    return {"distance": torch.tensor(distance, dtype=torch.float64),
            "f_pixels": torch.tensor(focal, dtype=torch.float64)}


def run_proj_grid(model, inp, meta):
    cam = (inp["camera_angle_x"], inp["distance"], inp["mesh_scale"])
    with torch.no_grad():
        lr = model(inp["fmap_bhwc"], *cam)                       # patch-token map, official default layout
        hr = model(inp["fmap_bchw"], *cam, layout="BCHW")
    R, S = model.grid_resolution, model.image_resolution
    coords = dense_grid_coords(R)
    projection = project_voxels(coords, R, S, *cam, batch=inp["fmap_bhwc"].shape[0])
    return {"proj_lr": lr, "proj_hr": hr, "grid_points": world_grid_points(coords, R),
            "image_points": projection.uv, "depth": projection.depth, "valid_mask": projection.visible}


def run_dino_extractor(model, inp, meta):
    keys = sorted(k for k in inp if k.startswith("image") and k.endswith("_u8"))
    images = [Image.fromarray(inp[k].numpy(), "RGB") for k in keys]
    with torch.no_grad():
        cond_global, cond_proj = model(images, camera_angle_x=inp["camera_angle_x"], distance=inp["distance"],
                                       mesh_scale=inp["mesh_scale"])
        image01 = model.image_tensor(images)
        tokens = model.dinov3_tokens(image01)
    return {"cond_global": cond_global, "cond_proj": cond_proj, "image_tensor": image01, "tokens": tokens}


def run_naf(model, inp, meta):
    with torch.no_grad():
        return {"out": model(inp["image"], inp["features"], tuple(meta["fixture"]["params"]["output_size"]))}


RUNNERS = {
    "preprocess_image": run_preprocess_image, "distance_from_fov": run_distance_from_fov,
    "proj_grid": run_proj_grid, "dino_extractor": run_dino_extractor, "naf": run_naf,
}

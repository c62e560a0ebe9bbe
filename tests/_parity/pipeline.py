"""Parity runner for the end-to-end `pipeline` fixture: our cascade on the fixture's 11 tiny modules."""
import torch
from PIL import Image

from pixal3d_backend.camera import ViewCamera
from pixal3d_backend.pipeline import ENCODER_KEYS, SAMPLER_KEYS, Normalization, Pixal3DPipeline


def run_pipeline(models, inp, meta):
    fx = meta["fixture"]
    pa, kw = fx["pipeline_args"], fx["run_kwargs"]
    settings = {stage: dict(pa[key]["params"]) for stage, key in SAMPLER_KEYS.items()}
    overrides = {stage: kw[f"{key}_params"] for stage, key in SAMPLER_KEYS.items() if f"{key}_params" in kw}
    pipe = Pixal3DPipeline(
        models={k: v for k, v in models.items() if k not in ENCODER_KEYS},
        encoders={k: v for k, v in models.items() if k in ENCODER_KEYS},
        sampler_settings=settings,
        shape_norm=Normalization.from_json(pa["shape_slat_normalization"]),
        tex_norm=Normalization.from_json(pa["tex_slat_normalization"]),
        sigma_min=pa["sparse_structure_sampler"]["args"]["sigma_min"])
    camera = ViewCamera(fov=float(inp["camera_angle_x"]), distance=float(inp["distance"]),
                          mesh_scale=float(inp["mesh_scale"]))
    cascade = int(kw["pipeline_type"].split("_")[0])
    trace = {}
    out = pipe.run(Image.fromarray(inp["image_rgba_u8"].numpy(), "RGBA"), camera, seed=int(inp["seed"]),
                   resolution=cascade, max_num_tokens=kw["max_num_tokens"], sampler_overrides=overrides,
                   preprocess=kw["preprocess_image"], trace=trace)
    result = dict(trace)
    result.update(resolution=torch.tensor(out.resolution, dtype=torch.int64),
                  shape_slat=out.shape_slat.feats, tex_slat=out.tex_slat.feats,
                  mesh_vertices=out.mesh.vertices, mesh_faces=out.mesh.faces,
                  voxel_coords=out.mesh.coords, voxel_attrs=out.mesh.attrs)
    return result


RUNNERS = {"pipeline": run_pipeline}

"""Parity runners for the three decoders, called the way `harness/ref_adapter.py` calls the official ones."""
import torch

from pixal3d_backend.models.sparse_vae import SparseUnetVaeDecoder
from pixal3d_backend.models.ss_decoder import occupancy_to_coords
from pixal3d_backend.sparse import SparseTensor


def run_ss_decoder(model, inp, meta):
    with torch.no_grad():
        logits = model(inp["latent"])
    return {"logits": logits, "coords": occupancy_to_coords(logits, meta["fixture"]["params"]["ss_res"])}


def run_shape_decoder(model, inp, meta):
    params = meta["fixture"]["params"]
    x = lambda: SparseTensor(inp["feats"], inp["coords"])
    with torch.no_grad():
        up = model.upsample(x(), upsample_times=params.get("upsample_times", 4))
        h, subs = SparseUnetVaeDecoder.forward(model, x(), return_subs=True)     # the raw 7-channel output
        model.set_resolution(params["resolution"])
        meshes, _ = model(x(), return_subs=True)
    out = {"upsample_coords": up, "voxel_coords": h.coords, "raw": h.feats}
    for i, s in enumerate(subs):
        out[f"sub{i}_logits"] = s.feats
        out[f"sub{i}_coords"] = s.coords
    for b, m in enumerate(meshes):
        out[f"mesh{b}_vertices"] = m.vertices
        out[f"mesh{b}_faces"] = m.faces
    return out


def run_tex_decoder(model, inp, meta):
    n = len([k for k in inp if k.startswith("sub") and k.endswith("_logits")])
    subs = [SparseTensor(inp[f"sub{i}_logits"], inp[f"sub{i}_coords"]) for i in range(n)]
    with torch.no_grad():
        raw = model(SparseTensor(inp["feats"], inp["coords"]), guide_subs=subs)
    return {"raw": raw.feats, "pbr": raw.feats * 0.5 + 0.5, "voxel_coords": raw.coords}


RUNNERS = {"ss_decoder": run_ss_decoder, "shape_decoder": run_shape_decoder, "tex_decoder": run_tex_decoder}

"""Parity runners for the flow transformers and the sampler (fixture kinds ss_flow, slat_flow, sampler).

Each mirrors the calling convention of the official harness (`harness/ref_adapter.py`): timesteps are already
1000*t, the negative condition is zeros for both 'global' and 'proj', sparse inputs are (coords, feats) pairs.
For `sampler` fixtures check.py passes the model of `fixture.model_fixture`, built and loaded strictly.
"""
import torch

from pixal3d_backend.sampler import FlowEulerGuidanceIntervalSampler
from pixal3d_backend.sparse import SparseTensor


def _zero_cond(cond):
    return {k: (v.replace(torch.zeros_like(v.feats)) if isinstance(v, SparseTensor) else torch.zeros_like(v))
            for k, v in cond.items()}


def _sparse_inputs(inp, feats_key):
    """(x, cond, extra forward kwargs) with every SparseTensor on the fixture's coords."""
    c = inp["coords"]
    x = SparseTensor(inp[feats_key], c)
    cond = {"global": inp["cond_global"], "proj": SparseTensor(inp["cond_proj"], c)}
    kw = {"concat_cond": SparseTensor(inp["concat_feats"], c)} if "concat_feats" in inp else {}
    return x, cond, kw


def run_ss_flow(model, inp, meta):
    cond = {"global": inp["cond_global"], "proj": inp["cond_proj"]}
    with torch.no_grad():
        return {"out": model(inp["x"], inp["t"], cond), "out_uncond": model(inp["x"], inp["t"], _zero_cond(cond))}


def run_slat_flow(model, inp, meta):
    x, cond, kw = _sparse_inputs(inp, "feats")
    with torch.no_grad():
        out = model(x, inp["t"], cond, **kw)
        out_uncond = model(x, inp["t"], _zero_cond(cond), **kw)
    assert torch.equal(out.coords, inp["coords"])
    return {"out": out.feats, "out_uncond": out_uncond.feats}


def run_sampler(model, inp, meta):
    if "coords" in inp:
        noise, cond, kw = _sparse_inputs(inp, "noise")
    else:
        noise, cond, kw = inp["noise"], {"global": inp["cond_global"], "proj": inp["cond_proj"]}, {}
    calls, calls_at_step_end = [], []

    def counting_model(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    result = FlowEulerGuidanceIntervalSampler(**meta["args"]).sample(
        counting_model, noise, cond, _zero_cond(cond), **meta["fixture"]["sampler_params"], **kw,
        on_step=lambda step, total: calls_at_step_end.append(len(calls)))
    feats = lambda x: x.feats if isinstance(x, SparseTensor) else x
    out = {f"x_t{i}": feats(x) for i, x in enumerate(result.pred_x_t)}
    out.update({f"x0_{i}": feats(x) for i, x in enumerate(result.pred_x_0)})
    out["samples"] = feats(result.samples)
    out["t_seq"] = torch.tensor(result.t_seq, dtype=torch.float64)
    out["calls_per_step"] = torch.tensor(calls_at_step_end).diff(prepend=torch.tensor([0]))
    return out


RUNNERS = {"ss_flow": run_ss_flow, "slat_flow": run_slat_flow, "sampler": run_sampler}

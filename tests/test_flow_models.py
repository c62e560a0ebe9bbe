"""Flow transformers, attention and the sampler beyond the parity fixtures: RoPE and attention properties,
batching invariance, dense/sparse agreement, the mixed-precision rule, the released-checkpoint manifests and the
sampler's schedule, guidance and cancellation."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import PARITY_DIR
from pixal3d_kernels.dit_pointwise import rms_norm_rope
from pixal3d_backend.models import build_model
from pixal3d_backend.models.attention import VarLenLayout, attention, rope_phases
from pixal3d_backend.models.flow_dit import SLatFlowModel, SparseStructureFlowModel, absolute_position_embedding
from pixal3d_backend.sampler import (STAGE_DEFAULTS, Cancelled, FlowEulerGuidanceIntervalSampler, per_sample_std,
                                     timesteps)
from pixal3d_backend.sparse import SparseTensor

SMALL = dict(resolution=4, in_channels=8, out_channels=8, model_channels=32, cond_channels=16, num_blocks=2,
             num_heads=2, mlp_ratio=2.5, pe_mode="rope", share_mod=True, qk_rms_norm=True, qk_rms_norm_cross=True,
             image_attn_mode="proj", proj_in_channels=12)


def _randomized(model):
    """Random values everywhere (the official init zeroes adaLN and the output layer, which hides bugs)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _grid_coords(r, batch):
    grid = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.full((r ** 3, 1), batch), grid], 1).int()


# ---------------------------------------------------------------------------------------------- RoPE, norms
def test_rope_rotates_consecutive_pairs_and_preserves_norms():
    head_dim = 16                                   # 2 frequencies per axis, 6 angles, 2 identity pairs
    coords = torch.tensor([[3, 5, 7]])
    phases = rope_phases(coords, head_dim)
    assert phases.shape == (1, 8) and phases.dtype == torch.complex64
    f1 = 1 / 10000 ** 0.5
    expected_angles = torch.tensor([3, 3 * f1, 5, 5 * f1, 7, 7 * f1, 0, 0])
    torch.testing.assert_close(phases[0].angle(), torch.atan2(expected_angles.sin(), expected_angles.cos()))
    x = torch.randn(1, 4, head_dim)                                  # [T, H, d]
    y = rms_norm_rope(x, None, phases)
    torch.testing.assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    torch.testing.assert_close(y[..., 12:], x[..., 12:])            # zero-angle padding leaves them untouched


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 24), torch.randn(1, 1, 24)
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 0, 9]])
    shift = torch.tensor([[5, 11, 2]])

    def score(pq, pk):
        return (rms_norm_rope(q, None, rope_phases(pq, 24)) * rms_norm_rope(k, None, rope_phases(pk, 24))).sum()
    torch.testing.assert_close(score(a, b), score(a + shift, b + shift), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(a, b), score(a, b + shift), rtol=1e-3)


def test_rms_norm_normalises_each_head_in_fp32_and_keeps_the_dtype():
    gamma = torch.arange(1, 4.0)[:, None].expand(3, 8)
    x = torch.randn(5, 3, 8, dtype=torch.bfloat16) * 100
    y = rms_norm_rope(x, gamma, None)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=-1), (torch.arange(1, 4.0) * math.sqrt(8)).expand(5, 3),
                               rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------------------------- attention
def _reference_attention(q, k, v):           # [L, H, d] per sample, explicit softmax
    w = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("hqk,khd->qhd", w, v)


@pytest.mark.parametrize("q_lens,kv_lens", [((5, 3, 7), (5, 3, 7)), ((6, 2), (4, 4)), ((4, 4), (3, 3))])
def test_packed_attention_equals_per_sample_attention(q_lens, kv_lens):
    q, k, v = torch.randn(sum(q_lens), 2, 8), torch.randn(sum(kv_lens), 2, 8), torch.randn(sum(kv_lens), 2, 8)
    out = attention(q, k, v, VarLenLayout(q_lens, kv_lens))
    expected = torch.cat([_reference_attention(*s) for s in zip(q.split(q_lens), k.split(kv_lens), v.split(kv_lens))])
    torch.testing.assert_close(out, expected)
    dense = attention(q[:q_lens[0]][None], k[:kv_lens[0]][None], v[:kv_lens[0]][None], None)
    torch.testing.assert_close(dense[0], expected[:q_lens[0]])


# ---------------------------------------------------------------------------------------------- models
def test_sparse_model_batch_equals_per_sample_runs():
    model = _randomized(SLatFlowModel(**{**SMALL, "in_channels": 12}))  # texture-like: 8 noise + 4 concat
    gen = torch.Generator().manual_seed(1)
    coords = [torch.unique(torch.randint(0, 6, (n, 3), generator=gen), dim=0) for n in (30, 12)]
    samples = []
    for b, c in enumerate(coords):
        n = len(c)
        samples.append(dict(coords=torch.cat([torch.full((n, 1), b), c], 1).int(), x=torch.randn(n, 8, generator=gen),
                            concat=torch.randn(n, 4, generator=gen), proj=torch.randn(n, 12, generator=gen),
                            glob=torch.randn(1, 5, 16, generator=gen), t=torch.rand(1, generator=gen) * 1000))

    def run(parts):
        coords = torch.cat([p["coords"] for p in parts])
        x = SparseTensor(torch.cat([p["x"] for p in parts]), coords)
        cond = {"global": torch.cat([p["glob"] for p in parts]),
                "proj": SparseTensor(torch.cat([p["proj"] for p in parts]), coords)}
        with torch.no_grad():
            out = model(x, torch.cat([p["t"] for p in parts]), cond,
                        concat_cond=SparseTensor(torch.cat([p["concat"] for p in parts]), coords))
        assert out.coords is x.coords
        return out.feats

    alone = [run([{**s, "coords": s["coords"].clone().index_fill_(1, torch.tensor([0]), 0)}]) for s in samples]
    torch.testing.assert_close(run(samples), torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_dense_and_sparse_models_agree_on_the_full_grid():
    """The dense token order ix*r*r + iy*r + iz and the dense RoPE buffer match sparse coords of the grid."""
    dense = _randomized(SparseStructureFlowModel(**SMALL))
    sparse = SLatFlowModel(**SMALL).eval()
    sparse.load_state_dict({k: v for k, v in dense.state_dict().items() if k != "rope_phases"})
    r, batch = SMALL["resolution"], 2
    x, t = torch.randn(batch, 8, r, r, r), torch.tensor([900.0, 150.0])
    glob, proj = torch.randn(batch, 5, 16), torch.randn(batch, r ** 3, 12)
    coords = torch.cat([_grid_coords(r, b) for b in range(batch)])
    tokens = lambda a: a.flatten(2).transpose(1, 2).reshape(batch * r ** 3, -1)
    with torch.no_grad():
        out_dense = dense(x, t, {"global": glob, "proj": proj})
        out_sparse = sparse(SparseTensor(tokens(x), coords), t,
                            {"global": glob, "proj": SparseTensor(proj.flatten(0, 1), coords)})
    torch.testing.assert_close(out_sparse.feats, tokens(out_dense), rtol=1e-5, atol=1e-5)


def test_absolute_position_embedding_is_the_official_sinusoid_per_axis():
    """TRELLIS's `AbsolutePositionEmbedder(channels, 3)`: per axis [sin(c f_j), cos(c f_j)], f_j = 10000^(-j/F),
    F = channels // 6, axes x, y, z one after another, zeros up to `channels` (written out for one cell)."""
    cell, channels = torch.tensor([[3, 0, 7]]), 32
    f = [10000.0 ** (-j / 5) for j in range(5)]
    expected = []
    for c in (3, 0, 7):
        expected += [math.sin(c * fj) for fj in f] + [math.cos(c * fj) for fj in f]
    expected += [0.0, 0.0]
    torch.testing.assert_close(absolute_position_embedding(cell, channels)[0], torch.tensor(expected))


def test_rope_flow_cannot_tell_depth_along_a_ray_and_ape_flow_can():
    """Why pe_mode "ape" is worth training: with RoPE, attention sees relative offsets only, so cells whose inputs
    are equal (the same lifted pixel along a line of sight) get the same update wherever they are; absolute
    embeddings make the update depend on the cell. Also: each mode keeps its own position buffer, loads strictly, and
    a state of the other mode does not load."""
    r = SMALL["resolution"]
    x = torch.full((1, 8, r, r, r), 0.3)
    cond = {"global": torch.randn(1, 5, 16), "proj": torch.ones(1, r ** 3, 12)}
    spread = {}
    for mode in ("rope", "ape"):
        model = _randomized(SparseStructureFlowModel(**{**SMALL, "pe_mode": mode}))
        with torch.no_grad():
            out = model(x, torch.tensor([500.0]), cond)
        spread[mode] = float(out.flatten(2).std(2).max())
        again = SparseStructureFlowModel(**{**SMALL, "pe_mode": mode})
        again.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(x, torch.tensor([500.0]), cond), out)
    assert spread["rope"] < 1e-5 and spread["ape"] > 1e-3, spread     # float rounding vs a real difference
    ape = SparseStructureFlowModel(**{**SMALL, "pe_mode": "ape"})
    assert "pos_emb" in ape.state_dict() and "rope_phases" not in ape.state_dict()
    with pytest.raises(RuntimeError, match="pos_emb"):
        ape.load_state_dict(SparseStructureFlowModel(**SMALL).state_dict())


@pytest.mark.parametrize("case", ["dense pair", "packed pair", "packed unequal"])
def test_fused_block_kernels_give_the_reference_output(monkeypatch, case):
    """The blocks' fused pointwise kernels (`pixal3d_kernels.dit_pointwise`; interpreted on CPU, compiled on a GPU)
    in the whole model: the dense grid, a CFG pair of one sparse sample (one modulation row per sample) and unequal
    packed samples (one row per token) give the reference path's output."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)
    t, glob = torch.tensor([900.0, 150.0], device=device), rand(2, 5, 16)
    if case == "dense pair":
        model, r = _randomized(SparseStructureFlowModel(**SMALL)).to(device), SMALL["resolution"]
        args = (rand(2, 8, r, r, r), t, {"global": glob, "proj": rand(2, r ** 3, 12)})
    else:
        model = _randomized(SLatFlowModel(**SMALL)).to(device)
        one = torch.unique(torch.randint(0, 6, (40, 3), generator=gen), dim=0)
        other = one if case == "packed pair" else one[:17]
        coords = torch.cat([torch.cat([torch.full((len(c), 1), b), c], 1) for b, c in enumerate((one, other))])
        coords = coords.int().to(device)
        args = (SparseTensor(rand(len(coords), 8), coords), t,
                {"global": glob, "proj": SparseTensor(rand(len(coords), 12), coords)})

    def run(kernels):
        monkeypatch.setenv("PIXAL3D_KERNELS", kernels)
        with torch.no_grad():
            out = model(*args)
        return out if case == "dense pair" else out.feats
    torch.testing.assert_close(run("triton"), run("torch"), rtol=1e-4, atol=1e-4)


def test_bf16_model_keeps_only_block_linears_in_bf16():
    fp32 = _randomized(SLatFlowModel(**SMALL))
    bf16 = SLatFlowModel(**SMALL, dtype="bfloat16")
    bf16.load_state_dict(fp32.state_dict())
    for name, p in bf16.named_parameters():
        in_block_linear = name.startswith("blocks.") and not any(s in name for s in ("norm", "modulation"))
        assert p.dtype == (torch.bfloat16 if in_block_linear else torch.float32), name
    coords = _grid_coords(3, 0)
    x = SparseTensor(torch.randn(len(coords), 8), coords)
    cond = {"global": torch.randn(1, 5, 16), "proj": SparseTensor(torch.randn(len(coords), 12), coords)}
    with torch.no_grad():
        ref, out = fp32(x, torch.tensor([500.0]), cond).feats, bf16(x, torch.tensor([500.0]), cond).feats
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("override,message", [({"image_attn_mode": "gated_proj"}, "image_attn_mode"),
                                              ({"pe_mode": "ape"}, "pe_mode"), ({"dtype": "float64"}, "dtype"),
                                              ({"num_heads": 3}, "head_dim")])
def test_unsupported_configs_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        SLatFlowModel(**{**SMALL, **override})


def test_sparse_model_rejects_misaligned_conditions():
    model = SLatFlowModel(**SMALL)
    coords = _grid_coords(2, 0)
    x = SparseTensor(torch.randn(8, 8), coords)
    with pytest.raises(ValueError, match="proj"):
        model(x, torch.tensor([1.0]),
              {"global": torch.randn(1, 5, 16), "proj": SparseTensor(torch.randn(7, 12), coords[:7])})


def _flow_manifests():
    paths = sorted(PARITY_DIR.glob("manifest_*.json"))
    return [p for p in paths if json.loads(p.read_text())["class"] in ("SparseStructureFlowModel", "SLatFlowModel",
                                                                       "ElasticSLatFlowModel")]


@pytest.mark.parametrize("path", _flow_manifests(), ids=lambda p: p.stem)
def test_full_size_model_matches_released_checkpoint_manifest(path):
    manifest = json.loads(path.read_text())
    with torch.device("meta"):
        model = build_model({"name": manifest["class"], "args": manifest["args"]})
    got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert got == {k: (shape, dtype) for k, shape, dtype in manifest["params"]}
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]


# ---------------------------------------------------------------------------------------------- sampler
def test_schedule_is_float64_and_hits_the_guidance_boundary_exactly():
    t = timesteps(12, 3.0)
    assert len(t) == 13 and t[0] == 1.0 and t[-1] == 0.0 and all(a > b for a, b in zip(t, t[1:]))
    assert t[8] == 0.6 and timesteps(3, 3.0)[2] == 0.6
    s = 1 - 5 / 12
    assert t[5] == 3.0 * s / (1 + 2.0 * s)


class _ExactVelocity:
    """The true velocity of the straight path from a known x0; counts calls and the conditions it sees."""

    def __init__(self, x0, sigma_min=1e-5):
        self.x0, self.sigma_min, self.conds = x0, sigma_min, []

    def __call__(self, x, t, cond, **kw):
        self.conds.append(cond["tag"])
        feats = x.feats if isinstance(x, SparseTensor) else x
        tt = float(t[0]) / 1000
        v = ((1 - self.sigma_min) * feats - self.x0) / (self.sigma_min + (1 - self.sigma_min) * tt)
        return x.replace(v) if isinstance(x, SparseTensor) else v


@pytest.mark.parametrize("sparse", [False, True])
def test_euler_with_exact_velocity_lands_on_x0_through_cfg_and_rescale(sparse):
    eps, x0 = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    noise = SparseTensor(eps, torch.cat([_grid_coords(2, 0)] * 5).index_fill_(1, torch.tensor([0]), 0)) if sparse \
        else eps[None]
    model = _ExactVelocity(x0 if sparse else x0[None])
    result = FlowEulerGuidanceIntervalSampler().sample(model, noise, {"tag": "pos"}, {"tag": "neg"},
                                                       **STAGE_DEFAULTS["shape"])
    feats = (lambda a: a.feats) if sparse else (lambda a: a[0])
    torch.testing.assert_close(feats(result.samples), x0 + 1e-5 * eps, rtol=1e-6, atol=1e-6)
    for pred in result.pred_x_0:
        torch.testing.assert_close(feats(pred), x0, rtol=1e-6, atol=1e-6)
    # CFG on the inclusive interval [0.6, 1.0]: steps 0..8 (t_8 = 0.6) take two passes, the last three one.
    assert model.conds == ["pos", "neg"] * 9 + ["pos"] * 3


def test_guidance_strength_one_is_a_single_conditional_pass_and_on_step_reports_progress():
    model, progress = _ExactVelocity(torch.zeros(1, 4)), []
    FlowEulerGuidanceIntervalSampler().sample(model, torch.randn(1, 4), {"tag": "pos"}, {"tag": "neg"},
                                              **STAGE_DEFAULTS["texture"], on_step=lambda i, n: progress.append((i, n)))
    assert model.conds == ["pos"] * 12 and progress == [(i, 12) for i in range(12)]


def test_cancellation_raises_between_steps():
    model, done = _ExactVelocity(torch.zeros(1, 4)), []
    with pytest.raises(Cancelled):
        FlowEulerGuidanceIntervalSampler().sample(model, torch.randn(1, 4), {"tag": "pos"}, {"tag": "neg"},
                                                  **STAGE_DEFAULTS["texture"], on_step=lambda i, n: done.append(i),
                                                  should_cancel=lambda: len(done) == 2)
    assert done == [0, 1] and len(model.conds) == 2


def test_cfg_rescale_std_is_unbiased_dense_and_population_sparse():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(per_sample_std(x, None).flatten(), torch.tensor([np.std(a, ddof=1) for a in x.numpy()]))
    coords = torch.cat([_grid_coords(2, 0)[:3], _grid_coords(2, 1)])
    feats = torch.randn(len(coords), 4, dtype=torch.float64)
    std = per_sample_std(feats, SparseTensor(feats, coords))
    assert std.shape == (11, 1)
    torch.testing.assert_close(std[:3, 0], torch.full((3,), np.std(feats[:3].numpy()), dtype=torch.float64))
    torch.testing.assert_close(std[3:, 0], torch.full((8,), np.std(feats[3:].numpy()), dtype=torch.float64))


@pytest.mark.parametrize("sparse", [False, True])
def test_batched_cfg_gives_the_two_pass_result_with_one_forward_per_guided_step(sparse):
    """The pipeline's `batch_cfg` runs a guided step's two passes as one forward of twice the batch: same samples
    (up to float reassociation), 12 forwards instead of 21 for the official shape schedule."""
    gen = torch.Generator().manual_seed(3)
    if sparse:
        model = _randomized(SLatFlowModel(**{**SMALL, "in_channels": 12}))
        coords = torch.unique(torch.randint(0, 6, (40, 3), generator=gen), dim=0)
        coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int64), coords], 1).int()
        noise = SparseTensor(torch.randn(len(coords), 8, generator=gen), coords)
        cond = {"global": torch.randn(1, 5, 16, generator=gen),
                "proj": noise.replace(torch.randn(len(coords), 12, generator=gen))}
        extra = {"concat_cond": noise.replace(torch.randn(len(coords), 4, generator=gen))}
    else:
        model = _randomized(SparseStructureFlowModel(**SMALL))
        r = SMALL["resolution"]
        noise = torch.randn(1, 8, r, r, r, generator=gen)
        cond = {"global": torch.randn(1, 5, 16, generator=gen), "proj": torch.randn(1, r ** 3, 12, generator=gen)}
        extra = {}
    neg = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v.replace(torch.zeros_like(v.feats))
           for k, v in cond.items()}
    forwards = []

    def counted(*args, **kwargs):
        forwards.append(args[1].shape[0])
        return model(*args, **kwargs)

    def run(batch_cfg):
        forwards.clear()
        out = FlowEulerGuidanceIntervalSampler().sample(counted, noise, cond, neg, **STAGE_DEFAULTS["shape"],
                                                        **extra, batch_cfg=batch_cfg).samples
        return (out.feats if sparse else out), list(forwards)

    two_pass, two_pass_forwards = run(False)
    batched, batched_forwards = run(True)
    torch.testing.assert_close(batched, two_pass, rtol=1e-5, atol=1e-5)
    assert two_pass_forwards == [1] * 21 and batched_forwards == [2] * 9 + [1] * 3

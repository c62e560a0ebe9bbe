"""Decoders: released-checkpoint layouts (manifests, meta device), C2S semantics, upsample/guide consistency."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import PARITY_DIR
from pixal3d_backend.models import build_model
from pixal3d_backend.models.sparse_vae import SparseUnetVaeDecoder, channel_to_space
from pixal3d_backend.models.ss_decoder import occupancy_to_coords, pixel_shuffle_3d
from pixal3d_backend.sparse import SparseTensor

DECODER_CLASSES = {"SparseStructureDecoder", "FlexiDualGridVaeDecoder", "SparseUnetVaeDecoder"}


def _decoder_manifests():
    found = []
    for path in sorted(PARITY_DIR.glob("manifest_*.json")):
        if json.loads(path.read_text()).get("class") in DECODER_CLASSES:
            found.append(path.name)
    return found or ["<no decoder manifests>"]


@pytest.mark.parametrize("manifest", _decoder_manifests())
def test_full_size_model_matches_released_manifest(manifest, parity_dir):
    m = json.loads((parity_dir / manifest).read_text())
    with torch.device("meta"):
        model = build_model({"name": m["class"], "args": m["args"]})
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    official = {k: [shape, dtype] for k, shape, dtype in m["params"]}
    assert sorted(ours) == sorted(official)
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == m["total_params"]


SMALL = {"model_channels": [16, 16, 8, 8, 8], "latent_channels": 8, "num_blocks": [1, 1, 1, 1, 0],
         "block_type": ["SparseConvNeXtBlock3d"] * 5, "up_block_type": ["SparseResBlockC2S3d"] * 4,
         "block_args": [{"use_checkpoint": False}] * 5}


def _latent(n_per_batch=(6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.cat([torch.full((n, 1), b), torch.randperm(27, generator=g)[:n, None]
                                   .repeat(1, 3) // torch.tensor([9, 3, 1]) % 3], 1)
                        for b, n in enumerate(n_per_batch)]).int()
    return SparseTensor(torch.randn(coords.shape[0], 8, generator=g), coords)


def _shape_decoder(seed=0):
    torch.manual_seed(seed)
    model = build_model({"name": "FlexiDualGridVaeDecoder", "args": {"resolution": 48, **SMALL}}).eval()
    for block in (stage[-1] for stage in model.blocks[:-1]):
        torch.nn.init.constant_(block.to_subdiv.bias, 0.2)     # keep about half of the children
    return model


def test_channel_to_space_child_order_and_channels():
    x = SparseTensor(torch.arange(16.).reshape(2, 8), torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32))
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[0, [6, 1]] = True
    keep[1, 0] = True
    parent, child, coords = channel_to_space(x, keep)
    assert parent.tolist() == [0, 0, 1] and child.tolist() == [1, 6, 0]    # parent-major, k ascending
    assert coords.tolist() == [[0, 3, 4, 6], [0, 2, 5, 7], [1, 0, 0, 0]]   # k = ox + 2*oy + 4*oz
    all_children = channel_to_space(x, None)[2]
    assert all_children.shape == (16, 4) and all_children[:8, 1:].sub(torch.tensor([2, 4, 6])).tolist() == \
        [[k & 1, k >> 1 & 1, k >> 2 & 1] for k in range(8)]


def test_upsample_coords_equal_decoded_voxels_and_meshes_follow_batches():
    model = _shape_decoder()
    x = _latent()
    with torch.no_grad():
        up = model.upsample(x, 4)
        h, subs = SparseUnetVaeDecoder.forward(model, x, return_subs=True)
        meshes = model(x)
    assert torch.equal(up, h.coords) and up.dtype == torch.int32
    assert len(subs) == 4 and [s.feats.shape[1] for s in subs] == [8] * 4
    assert torch.equal(subs[0].coords, x.coords)
    assert len(meshes) == 2
    for b, mesh in enumerate(meshes):
        rows = h.coords[:, 0] == b
        assert torch.equal(mesh.coords, h.coords[rows, 1:]) and mesh.vertices.shape == (int(rows.sum()), 3)
        assert mesh.voxel_size == 1 / 48
    with torch.no_grad():
        assert torch.equal(model.upsample(x, 2), subs[2].coords)


def test_texture_decoder_guided_by_shape_subs_has_the_same_voxels():
    shape = _shape_decoder()
    torch.manual_seed(1)
    tex = build_model({"name": "SparseUnetVaeDecoder", "args": {"out_channels": 6, "pred_subdiv": False, **SMALL}})
    x = _latent()
    with torch.no_grad():
        h, subs = SparseUnetVaeDecoder.forward(shape, x, return_subs=True)
        out = tex(SparseTensor(torch.randn_like(x.feats), x.coords), guide_subs=subs)
        unguided = tex(SparseTensor(torch.randn(1, 8), torch.zeros(1, 4, dtype=torch.int32)))
    assert torch.equal(out.coords, h.coords) and out.feats.shape == (h.coords.shape[0], 6)
    assert unguided.coords.shape[0] == 8 ** 4                                  # no guide: every child kept
    with torch.no_grad():
        meshes, _ = shape(x, guide_subs=subs, return_subs=True)           # its own hierarchy as a guide: same voxels
    assert torch.equal(torch.cat([m.coords for m in meshes]), h.coords[:, 1:])


def test_fp16_decoder_runs_blocks_in_half_and_returns_fp32():
    torch.manual_seed(0)
    args = {"out_channels": 6, "pred_subdiv": False, **SMALL}
    model = build_model({"name": "SparseUnetVaeDecoder", "args": {**args, "use_fp16": True}})
    assert model.blocks[0][0].conv.weight.dtype == model.blocks[0][1].conv1.weight.dtype == torch.float16
    assert model.blocks[0][0].norm.weight.dtype == torch.float32
    assert model.from_latent.weight.dtype == model.output_layer.weight.dtype == torch.float32
    reference = build_model({"name": "SparseUnetVaeDecoder", "args": args})
    reference.load_state_dict(model.state_dict())        # fp16 weights upcast: same numbers, fp32 compute
    x = SparseTensor(torch.randn(1, 8), torch.zeros(1, 4, dtype=torch.int32))
    with torch.no_grad():
        half, full = model(x), reference(x)
    assert half.feats.dtype == torch.float32 and torch.equal(half.coords, full.coords)
    torch.testing.assert_close(half.feats, full.feats, rtol=0.02, atol=0.02)
    assert not torch.equal(half.feats, full.feats)       # the blocks really ran in half precision


def test_pixel_shuffle_3d_channel_order():
    x = torch.arange(16.).reshape(1, 16, 1, 1, 1)
    y = pixel_shuffle_3d(x, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert y[0, c, i, j, k] == c * 8 + 4 * i + 2 * j + k


def test_ss_decoder_shapes_and_occupancy_post_processing():
    torch.manual_seed(0)
    model = build_model({"name": "SparseStructureDecoder", "args": {
        "out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "channels": [16, 8, 8],
        "num_res_blocks_middle": 1, "norm_type": "layer", "use_fp16": False}})
    with torch.no_grad():
        logits = model(torch.randn(2, 8, 4, 4, 4))
    assert logits.shape == (2, 1, 16, 16, 16)
    coords = occupancy_to_coords(logits, resolution=8)
    occupied = F.max_pool3d((logits > 0).float(), 2) > 0.5
    assert coords.dtype == torch.int32 and coords.is_contiguous()
    assert coords.shape[0] == int(occupied.sum())
    assert bool(occupied[coords[:, 0].long(), 0, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()].all())
    keys = ((coords[:, 0] * 8 + coords[:, 1]) * 8 + coords[:, 2]) * 8 + coords[:, 3]
    assert bool((keys[1:] > keys[:-1]).all())                   # argwhere (row-major) order

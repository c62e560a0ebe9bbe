"""Loading snapshots: strict keys with errors that name the file and keys, the offline HF cache, the official
checkpoint configs against the parity manifests."""
import json

import pytest
import torch
from safetensors.torch import save_file

from pixal3d_backend.loading import CheckpointError, Snapshot, load_checkpoint, resolve_snapshot
from pixal3d_backend.models import build_model
from pixal3d_backend.official import CHECKPOINTS

TINY_FLOW = {"name": "ElasticSLatFlowModel", "args": {
    "resolution": 16, "in_channels": 8, "out_channels": 8, "model_channels": 64, "cond_channels": 32,
    "num_blocks": 1, "num_heads": 2, "mlp_ratio": 4, "pe_mode": "rope", "share_mod": True, "qk_rms_norm": True,
    "qk_rms_norm_cross": True, "image_attn_mode": "proj", "proj_in_channels": 16, "dtype": "bfloat16"}}


def write_checkpoint(folder, name, config, state_dict):
    (folder / "ckpts").mkdir(parents=True, exist_ok=True)
    (folder / "ckpts" / f"{name}.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "ckpts" / f"{name}.safetensors"))


def fp32_state_dict(config):
    torch.manual_seed(0)
    return {k: v.float() for k, v in build_model(config).state_dict().items()}


def test_fp32_storage_loads_into_the_official_bf16_layout(tmp_path):
    sd = fp32_state_dict(TINY_FLOW)
    write_checkpoint(tmp_path, "flow", TINY_FLOW, sd)
    model = load_checkpoint(tmp_path / "ckpts/flow.json", tmp_path / "ckpts/flow.safetensors")
    loaded = model.state_dict()
    assert loaded["blocks.0.self_attn.to_qkv.weight"].dtype == torch.bfloat16     # Linear inside blocks: bf16
    assert loaded["input_layer.weight"].dtype == torch.float32                    # outside blocks: fp32
    assert torch.equal(loaded["input_layer.weight"], sd["input_layer.weight"])
    assert torch.equal(loaded["blocks.0.self_attn.to_qkv.weight"], sd["blocks.0.self_attn.to_qkv.weight"].bfloat16())
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_and_unexpected_keys_name_the_file(tmp_path):
    sd = fp32_state_dict(TINY_FLOW)
    del sd["blocks.0.cross_attn.proj_linear.weight"]
    sd["blocks.0.cross_attn.to_q.weight"] = torch.zeros(64, 64)          # TRELLIS.2 naming, not Pixal3D
    write_checkpoint(tmp_path, "flow", TINY_FLOW, sd)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "ckpts/flow.json", tmp_path / "ckpts/flow.safetensors")
    msg = str(e.value)
    assert "flow.safetensors" in msg
    assert "blocks.0.cross_attn.proj_linear.weight" in msg and "missing" in msg
    assert "blocks.0.cross_attn.to_q.weight" in msg and "unexpected" in msg


def test_shape_mismatch_is_reported(tmp_path):
    sd = fp32_state_dict(TINY_FLOW)
    sd["out_layer.weight"] = torch.zeros(9, 64)
    write_checkpoint(tmp_path, "flow", TINY_FLOW, sd)
    with pytest.raises(CheckpointError, match=r"shape of out_layer.weight: checkpoint \(9, 64\), model \(8, 64\)"):
        load_checkpoint(tmp_path / "ckpts/flow.json", tmp_path / "ckpts/flow.safetensors")


def test_snapshot_from_the_offline_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / "models--TencentARC--Pixal3D" / "snapshots" / "abc123"
    write_checkpoint(snap, "flow", TINY_FLOW, fp32_state_dict(TINY_FLOW))
    (snap / "pipeline.json").write_text(json.dumps({"name": "Pixal3DImageTo3DPipeline",
                                                     "args": {"models": {"shape_slat_flow_model_512": "ckpts/flow"}}}))
    (tmp_path / "hub" / "models--TencentARC--Pixal3D" / "refs").mkdir()
    (tmp_path / "hub" / "models--TencentARC--Pixal3D" / "refs" / "main").write_text("abc123\n")
    assert resolve_snapshot("TencentARC/Pixal3D") == snap
    model = Snapshot.open("TencentARC/Pixal3D").load("shape_slat_flow_model_512")
    assert model.out_channels == 8


def test_repo_not_in_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="pixal3d weights download"):
        resolve_snapshot("TencentARC/Pixal3D")
    with pytest.raises(CheckpointError, match="no pipeline.json"):
        resolve_snapshot(tmp_path)


@pytest.mark.parametrize("key", sorted(CHECKPOINTS))
def test_official_configs_build_the_manifest_architecture(key, parity_dir):
    name, config = CHECKPOINTS[key]
    manifest = json.loads((parity_dir / f"manifest_{name}.json").read_text())
    assert manifest["class"] in (config["name"], "SLatFlowModel")
    with torch.device("meta"):
        model = build_model(config)
    built = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    expected = {k: (list(shape), dtype.replace("torch.", "")) for k, shape, dtype in manifest["params"]}
    assert built == expected


def test_building_skips_random_initialisation_and_restores_it_after_a_failed_load(tmp_path):
    """`load_checkpoint` builds without `torch.nn.init` (the strict load overwrites every tensor), and leaves
    torch's initialisers as they were, also when the load fails."""
    from pixal3d_backend.loading import initialisation_skipped
    originals = {n: getattr(torch.nn.init, n) for n in ("normal_", "kaiming_uniform_", "trunc_normal_", "zeros_")}
    with initialisation_skipped():
        weight = torch.full((3, 4), 7.0)
        torch.nn.init.kaiming_uniform_(weight)
        torch.nn.init.zeros_(weight)
        assert (weight == 7.0).all()
    (tmp_path / "m.json").write_text('{"name": "SparseStructureDecoder", "args": {"out_channels": 1, '
                                     '"latent_channels": 8, "num_res_blocks": 1, "channels": [8, 8]}}')
    with pytest.raises(CheckpointError, match="missing weights"):
        load_checkpoint(tmp_path / "m.json", tmp_path / "m.safetensors")
    assert {n: getattr(torch.nn.init, n) for n in originals} == originals
    weight = torch.full((3, 4), 7.0)
    torch.nn.init.zeros_(weight)
    assert (weight == 0).all()

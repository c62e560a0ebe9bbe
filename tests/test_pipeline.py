"""The whole cascade on CPU, loaded the way users load the official release.

The tiny random-weight models of the `pipeline_e2e` parity fixture are written out as an official-layout snapshot
(pipeline.json + ckpts/*.json + *.safetensors, a DINOv3 folder saved by transformers, a NAF .pth), loaded with
`load_model` and run from an RGBA image to a mesh with PBR voxel attributes: twice, bit-identical, and equal to
the official outputs.
"""
import json
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pixal3d_backend.camera import ViewCamera
from pixal3d_backend.loading import CheckpointError, load_model
from pixal3d_backend.pipeline import SAMPLER_KEYS, hr_grid_coords

EXTRACTOR_KEYS = ("model_name", "dinov3_config", "naf_config")


@pytest.fixture(scope="module")
def fixture(parity_dir):
    meta = json.loads((parity_dir / "pipeline_e2e.json").read_text())
    tensors = load_file(str(parity_dir / "pipeline_e2e.safetensors"))
    naf_source = load_file(str(parity_dir / "dino_proj_extractor_naf.safetensors"))
    return meta["fixture"], tensors, naf_source


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, fixture):
    """The fixture's models as an official snapshot + helper models, as `pixal3d weights download` leaves them."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    fx, tensors, naf_source = fixture
    root = tmp_path_factory.mktemp("snapshot")
    (root / "ckpts").mkdir()
    models, stages = {}, {}
    for key, spec in fx["models"].items():
        prefix = f"state_dict.{spec['prefix']}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if spec["name"] == "DinoV3ProjFeatureExtractor":
            stages[key] = {k: v for k, v in spec["args"].items() if k not in EXTRACTOR_KEYS}
            dino = DINOv3ViTModel(DINOv3ViTConfig(**spec["args"]["dinov3_config"]))
            dino.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
            continue
        models[key] = f"ckpts/{key}"
        (root / "ckpts" / f"{key}.json").write_text(json.dumps({"name": spec["name"], "args": spec["args"]}))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "ckpts" / f"{key}.safetensors"))
    dino.save_pretrained(root / "dinov3")
    naf = {k[len("state_dict.naf_model."):]: v for k, v in naf_source.items() if k.startswith("state_dict.naf_model.")}
    torch.save(naf, root / "naf_release.pth")
    pa = fx["pipeline_args"]
    args = {"models": models, **{k: pa[k] for k in SAMPLER_KEYS.values()},
            "shape_slat_normalization": pa["shape_slat_normalization"],
            "tex_slat_normalization": pa["tex_slat_normalization"]}
    (root / "pipeline.json").write_text(json.dumps({"name": "Pixal3DImageTo3DPipeline", "args": args}))
    return root, stages


def run_once(model, fx, tensors):
    kw = fx["run_kwargs"]
    overrides = {stage: kw[f"{key}_params"] for stage, key in SAMPLER_KEYS.items()}
    camera = ViewCamera(fov=float(tensors["input.camera_angle_x"]), distance=float(tensors["input.distance"]),
                        mesh_scale=float(tensors["input.mesh_scale"]))
    image = Image.fromarray(tensors["input.image_rgba_u8"].numpy(), "RGBA")
    return model.pipeline.run(image, camera, seed=int(tensors["input.seed"]), resolution=1024,
                              sampler_overrides=overrides)


@pytest.mark.slow
def test_snapshot_cascade_matches_official_and_is_deterministic(snapshot, fixture):
    root, stages = snapshot
    fx, tensors, _ = fixture
    model = load_model(root, dinov3_path=root / "dinov3", naf_path=root / "naf_release.pth", encoder_stages=stages)
    t0 = time.perf_counter()
    first = run_once(model, fx, tensors)
    elapsed = time.perf_counter() - t0
    second = run_once(model, fx, tensors)
    print(f"cascade on CPU: {elapsed:.1f} s, {first.tokens}")
    for name in ("vertices", "faces", "coords", "attrs"):
        assert torch.equal(getattr(first.mesh, name), getattr(second.mesh, name)), f"mesh.{name} differs between runs"
    ref = {k[len("output."):]: v for k, v in tensors.items() if k.startswith("output.")}
    assert first.resolution == int(ref["resolution"])
    assert torch.equal(first.mesh.coords, ref["voxel_coords"])
    assert first.mesh.attrs.shape == (ref["voxel_coords"].shape[0], 6)
    err = (first.mesh.attrs - ref["voxel_attrs"]).abs().max() / ref["voxel_attrs"].abs().max()
    assert err < 2e-3
    assert torch.allclose(first.mesh.vertices, ref["mesh_vertices"], atol=1e-5)


def test_helper_models_missing_is_a_clear_error(snapshot, monkeypatch, tmp_path):
    root, stages = snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("PIXAL3D_DINOV3", raising=False)
    with pytest.raises(CheckpointError, match="DINOv3"):
        load_model(root, naf_path=root / "naf_release.pth", encoder_stages=stages)
    with pytest.raises(CheckpointError, match="NAF weights not found"):
        load_model(root, dinov3_path=root / "dinov3", naf_path=tmp_path / "nope.pth", encoder_stages=stages)


def test_token_cap_steps_the_resolution_down():
    # a dense 512^3 block of coords: at 1536 (G=96) it has far more tokens than the cap allows
    side = torch.arange(0, 512, 4)
    xyz = torch.stack(torch.meshgrid(side, side, side[:8], indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1).int()
    hr, res = hr_grid_coords(coords, 1536, max_num_tokens=20_000)
    assert res < 1536 and res % 128 == 0 and (hr.shape[0] < 20_000 or res == 1024)
    g = res // 16
    assert hr[:, 1:].max() == g - 1 and hr[:, 1:].min() == 0       # corner-aligned: 511.5/512*(G-1) rounds to G-1
    full, res_full = hr_grid_coords(coords, 1536, max_num_tokens=10 ** 9)
    assert res_full == 1536 and full.shape[0] > hr.shape[0]

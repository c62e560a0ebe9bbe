"""The official multi-view fine-tunes (`<checkpoint>_mv`, spec §3.2): loaded when a snapshot has them, used for
several views only, reported in the capabilities; a partial set is refused. The bundled model's files stand in
for both weight sets (same architecture and key names, as the official `*_mv` files are)."""
import shutil

import pytest
import torch
from PIL import Image

from pixal3d_backend.camera import ViewCamera
from pixal3d_backend.loading import DEFAULT_MODEL_DIR, CheckpointError, load_model
from pixal3d_backend.pipeline import FLOW_KEYS, RunContext
from pixal3d_backend.service import Generator

FLOWS = ("ss_flow_img_dit_small_16", "slat_flow_img2shape_dit_small_512", "slat_flow_imgshape2tex_dit_small_512")


def snapshot_with_mv(root, flows=FLOWS):
    shutil.copytree(DEFAULT_MODEL_DIR, root, ignore=shutil.ignore_patterns("*.md"))
    for name in flows:
        for suffix in (".json", ".safetensors"):
            (root / "ckpts" / f"{name}_mv{suffix}").symlink_to(root / "ckpts" / f"{name}{suffix}")
    return root


def run_context(views: int) -> RunContext:
    image = Image.new("RGB", (64, 64))
    return RunContext([image] * views, [ViewCamera(0.5, distance=2.0)] * views, torch.Generator())


@pytest.mark.slow
def test_multiview_flows_are_loaded_and_used_for_several_views_only(tmp_path):
    model = load_model(snapshot_with_mv(tmp_path / "snap"), device="cpu")
    pipeline = model.pipeline
    assert pipeline.multiview_weights and Generator(model).capabilities()["multiview"] is True
    for key in pipeline.models:
        if key in FLOW_KEYS:
            assert pipeline._flow(key, run_context(1)) is pipeline.models[key]
            assert pipeline._flow(key, run_context(3)) is pipeline.multiview_models[key]
    single_view = load_model(None)
    assert Generator(single_view).capabilities()["multiview"] is False
    assert model.model_hash != single_view.model_hash      # the identity covers the extra weights


def test_a_partial_multiview_set_is_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="slat_flow_imgshape2tex_dit_small_512_mv"):
        load_model(snapshot_with_mv(tmp_path / "snap", FLOWS[:2]), device="cpu")

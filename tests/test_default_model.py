"""The bundled default model: present, small, and loaded strictly by the same loader as official snapshots."""
import json

from pixal3d_backend.loading import DEFAULT_MODEL_DIR, Snapshot, load_model
from pixal3d_backend.pipeline import SINGLE_STAGE_KEYS


def test_bundled_snapshot_is_complete_and_within_budget():
    snapshot = Snapshot.open(DEFAULT_MODEL_DIR)
    assert set(snapshot.pipeline_args["models"]) == set(SINGLE_STAGE_KEYS)
    total = 0
    for key in SINGLE_STAGE_KEYS:
        config, weights = snapshot.checkpoint_files(key)
        assert json.loads(config.read_text())["name"]
        total += weights.stat().st_size
    assert total <= 50 * 2 ** 20


def test_default_model_loads_strictly_as_a_single_stage_cascade():
    model = load_model(None)
    assert model.model_id == "default"
    assert not model.pipeline.two_stage and model.resolutions == (256,)
    assert model.default_options["resolution"] == 256
    assert len(model.model_hash) == 16 and model.model_hash == load_model(None).model_hash

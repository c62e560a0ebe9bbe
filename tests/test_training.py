"""Training stack of the default model on tiny configs (CPU): encoder/decoder round trips, loss decrease,
bit-identical resume, and an exported snapshot that loads strictly."""
from __future__ import annotations

import shutil

import pytest
import torch

from pixal3d_backend.models.sparse_vae import SparseUnetVaeDecoder
from pixal3d_backend.sparse import SparseTensor
from pixal3d_backend.training import configs, losses, stages, train
from pixal3d_backend.training.batches import ViewGenerator, Views, generate_pool, occupancy, shape_inputs
from pixal3d_backend.training.voxels import coarsen, lookup, space_to_channel, subdivision_guides

torch.set_num_threads(1)

_DINO = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "patch_size": 16, "image_size": 64, "num_register_tokens": 4, "rope_theta": 100.0}


def _flow(name, res, cin, cout):
    return {"name": name, "args": {"resolution": res, "in_channels": cin, "out_channels": cout, "model_channels": 32,
                                   "cond_channels": 32, "proj_in_channels": 32, "num_blocks": 1, "num_heads": 2,
                                   "qk_rms_norm": True, "qk_rms_norm_cross": True, "initialization": "scaled"}}


def _dec(name, channels, extra):
    return {"name": name, "args": {"model_channels": channels, "num_blocks": [1, 1, 0, 0],
                                   "block_type": ["SparseConvNeXtBlock3d"] * 4,
                                   "up_block_type": ["SparseResBlockC2S3d"] * 3, **extra}}


TINY = {
    "sparse_structure_flow_model": _flow("SparseStructureFlowModel", 4, 8, 8),
    "sparse_structure_decoder": {"name": "SparseStructureDecoder", "args": {
        "out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "num_res_blocks_middle": 1,
        "channels": [16, 8, 8]}},
    "shape_slat_flow_model_512": _flow("SLatFlowModel", 8, 4, 4),
    "tex_slat_flow_model_512": _flow("SLatFlowModel", 8, 8, 4),
    "shape_slat_decoder": _dec("FlexiDualGridVaeDecoder", [32, 16, 16, 8], {"resolution": 64, "latent_channels": 4}),
    "tex_slat_decoder": _dec("SparseUnetVaeDecoder", [32, 16, 16, 8],
                             {"out_channels": 6, "latent_channels": 4, "pred_subdiv": False}),
    **{k: {"name": "DinoV3ProjFeatureExtractor", "args": {"image_size": 64, "grid_resolution": g,
                                                          "dinov3_config": _DINO}}
       for k, g in (("image_cond_model_ss", 4), ("image_cond_model_shape_512", 8), ("image_cond_model_tex_512", 8))},
    "ss_encoder": {"name": "SparseStructureEncoder", "args": {
        "in_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "num_res_blocks_middle": 1,
        "channels": [8, 8, 16]}},
    "shape_encoder": {"name": "FlexiDualGridVaeEncoder", "args": {
        "model_channels": [8, 16, 16, 32], "num_blocks": [0, 0, 1, 1], "latent_channels": 4}},
    "tex_encoder": {"name": "SparseUnetVaeEncoder", "args": {
        "in_channels": 6, "model_channels": [8, 16, 16, 32], "num_blocks": [0, 0, 1, 1], "latent_channels": 4}},
}


@pytest.fixture(autouse=True)
def tiny_resolutions(monkeypatch):
    for name, value in (("SS_LATENT_RESOLUTION", 4), ("SS_RESOLUTION", 16), ("TOKEN_RESOLUTION", 8),
                        ("SHAPE_RESOLUTION", 64), ("IMAGE_SIZE", 64)):
        monkeypatch.setattr(configs, name, value)
    for stage in configs.STAGES:
        monkeypatch.setitem(stages.VIEWS_PER_STEP, stage, 2)


@pytest.fixture(scope="module")
def pool():
    """Two objects x two views with images, at the tiny resolutions (generated once)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("SHAPE_RESOLUTION", 64), ("SS_RESOLUTION", 16), ("IMAGE_SIZE", 64)):
            mp.setattr(configs, name, value)
        views, _ = generate_pool(ViewGenerator(1, "cpu", True, supersample=1), 2, 0, lambda v: v)
    return views


def test_space_to_channel_inverts_channel_to_space(pool):
    x = SparseTensor(torch.randn(len(pool.coords), 3), pool.coords)
    parents = space_to_channel(x)
    assert torch.equal(parents.coords, coarsen(pool.coords, 2))
    guides, coords = subdivision_guides(parents.coords, pool.coords, 1, 64)
    rows = lookup(coords, pool.coords, 64)
    assert (rows >= 0).all() and len(rows) == len(pool.coords)           # every true voxel, nothing else
    from pixal3d_backend.models.sparse_vae import channel_to_space
    parent, child, c2s_coords = channel_to_space(parents, guides[0].feats > 0)
    assert torch.equal(c2s_coords, coords)
    children = parents.feats.reshape(-1, 8, 3)[parent, child]
    assert torch.equal(children, x.feats[rows])


def test_encoders_round_trip_shapes(pool):
    batch = pool.select(torch.tensor([0, 1]))
    ss_enc, ss_dec = stages.build("ss_encoder", TINY), stages.build("sparse_structure_decoder", TINY)
    occ = occupancy(batch)
    mean, logvar = ss_enc(occ)
    assert mean.shape == logvar.shape == (2, 8, 4, 4, 4)
    assert ss_dec(mean).shape == occ.shape
    enc, dec = stages.build("shape_encoder", TINY), stages.build("shape_slat_decoder", TINY)
    mean, logvar = enc(shape_inputs(batch))
    assert torch.equal(mean.coords, coarsen(batch.coords, 8)) and logvar.shape == (len(mean.coords), 4)
    guides, coords = subdivision_guides(mean.coords, batch.coords, 3, 64)
    with stages.teacher_forcing(dec, guides) as predicted:
        raw = SparseUnetVaeDecoder.forward(dec, mean)
    assert torch.equal(raw.coords, coords) and raw.feats.shape == (len(batch.coords), 7)
    assert [p.shape[0] for p in predicted] == [g.feats.shape[0] for g in guides]


@pytest.mark.parametrize("stage", configs.STAGES)
def test_steps_reduce_loss_on_a_fixed_batch(stage, pool, tmp_path):
    for dep in stages.DEPENDS[stage]:
        _finished_stage(dep, pool, tmp_path)
    frozen, normalization = train.dependencies(tmp_path, stage, "cpu", TINY)
    st = stages.STAGE_CLASSES[stage](stage, frozen, normalization, TINY)
    batch = st.prepare(pool.select(torch.tensor([0, 1])))
    opt = torch.optim.Adam(st.models.parameters(), lr=2e-3)
    values = []
    for _ in range(6):
        loss = st.losses(batch, torch.Generator().manual_seed(0))["loss"]   # same noise every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[-1] < values[0], values


def _finished_stage(stage, pool, out):
    trainer = train.Trainer(stage, out, "cpu", overrides=TINY)
    trainer.finish(pool)
    return trainer


def _trainer(stage, out, monkeypatch, pool):
    monkeypatch.setattr(train, "generate_pool", lambda _g, _b, _w, transform, deadline=None: (transform(pool), 2))
    return train.Trainer(stage, out, "cpu", overrides=TINY, log_every=1)


def test_resume_is_bit_identical(pool, tmp_path, monkeypatch):
    straight = _trainer("shape_vae", tmp_path / "a", monkeypatch, pool)
    straight.run(minutes=5, resume=False, max_steps=4)
    first = _trainer("shape_vae", tmp_path / "b", monkeypatch, pool)
    first.run(minutes=5, resume=False, max_steps=2)
    resumed = _trainer("shape_vae", tmp_path / "b", monkeypatch, pool)
    resumed.run(minutes=5, resume=True, max_steps=4)
    assert resumed.step == straight.step == 4
    a, b = straight.models.state_dict(), resumed.models.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema.params[k], resumed.ema.params[k]) for k in a if k in straight.ema.params)
    norm = train.load_weights(tmp_path / "b" / "shape_vae" / "weights.safetensors")[1]["normalization"]["shape"]
    assert len(norm["mean"]) == len(norm["std"]) == 4


def test_decoder_fine_tune_keeps_the_encoder_and_its_latent_normalisation(pool, tmp_path, monkeypatch):
    """`--freeze-encoder`: the decoder trains on the earlier encoder's latents, so the flows stay valid; the encoder
    weights and the pipeline's latent normalisation come out unchanged."""
    first = _trainer("tex_vae", tmp_path, monkeypatch, pool)
    first.run(minutes=5, resume=False, max_steps=2)
    before, meta = train.load_weights(tmp_path / "tex_vae" / "weights.safetensors")
    tuned = train.Trainer("tex_vae", tmp_path, "cpu", overrides=TINY, log_every=1, freeze_encoder=True)
    tuned.run(minutes=5, resume=False, max_steps=3, init=tmp_path)
    after, meta_after = train.load_weights(tmp_path / "tex_vae" / "weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("tex_encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("tex_slat_decoder."))
    assert meta_after["normalization"] == meta["normalization"] and meta_after["step"] == 3
    with pytest.raises(ValueError, match="for VAE stages"):
        train.Trainer("tex_flow", tmp_path, "cpu", overrides=TINY, freeze_encoder=True)


def test_export_default_writes_a_strictly_loadable_snapshot(pool, tmp_path, monkeypatch):
    from pixal3d_backend.loading import Snapshot
    from pixal3d_backend.training import export_default

    monkeypatch.setattr(train, "generate_pool", lambda _g, _b, _w, transform, deadline=None: (transform(pool), 2))
    run = tmp_path / "run"
    for stage in configs.STAGES:
        train.Trainer(stage, run, "cpu", overrides=TINY, log_every=1).run(minutes=5, resume=False, max_steps=2)
    # a fine-tune from the run's own weights is a second phase: the card sums its steps
    train.Trainer("shape_flow", run, "cpu", overrides=TINY, log_every=1).run(minutes=5, resume=False, max_steps=2,
                                                                             init=run)
    evaluation = {"command": "pixal3d eval --objects 2", "metrics": {"mask_iou": 0.5}}
    out = export_default.export(run, evaluation, tmp_path / "snapshot")
    snapshot = Snapshot.open(out)
    assert snapshot.pipeline_args["cascade"] == "single_stage_512"
    for key in export_default.CKPT_NAMES:
        snapshot.load(key)                                   # strict: every key, every shape
    card = (out / "MODEL_CARD.md").read_text()
    assert "mask_iou | 0.5" in card and "| shape_flow | 2 | 4 |" in card and "| tex_flow | 1 | 2 |" in card

    # a whole-VAE fine-tune from the snapshot: its decoder from the snapshot, its encoder from the run's own weights
    tensors, _ = train.load_weights(run / "tex_vae" / "weights.safetensors")
    tuned = train.Trainer("tex_vae", run, "cpu", overrides=TINY)
    tuned.initialise_from(out)
    encoder, decoder = tuned.models["tex_encoder"].state_dict(), tuned.models["tex_slat_decoder"].state_dict()
    assert all(torch.equal(v, tensors["tex_encoder." + k].float()) for k, v in encoder.items())
    shipped = snapshot.load("tex_slat_decoder").state_dict()
    assert all(torch.equal(v, shipped[k].float()) for k, v in decoder.items())
    with pytest.raises(ValueError, match="no \\['tex_encoder'\\]"):
        train.Trainer("tex_vae", tmp_path / "fresh", "cpu", overrides=TINY).initialise_from(out)

    # a variant of one stage, trained from the snapshot, swapped into a copy of it (to evaluate side by side)
    variant = tmp_path / "variant"
    for stage in ("ss_vae", "shape_vae", "tex_vae"):
        shutil.copytree(run / stage, variant / stage)
    train.Trainer("ss_flow", variant, "cpu", overrides=TINY, log_every=1).run(minutes=5, resume=False, max_steps=2,
                                                                              init=out)
    export_default.main(["--base", str(out), "--replace", str(variant / "ss_flow" / "weights.safetensors"),
                         "--out", str(tmp_path / "swapped")])
    swapped = Snapshot.open(tmp_path / "swapped")
    trained, _ = train.load_weights(variant / "ss_flow" / "weights.safetensors")
    for key in export_default.CKPT_NAMES:
        mine, theirs = swapped.load(key).state_dict(), snapshot.load(key).state_dict()
        if key in ("sparse_structure_flow_model", "image_cond_model_ss"):
            assert all(torch.equal(v, trained[f"{key}.{k}"].to(v.dtype)) for k, v in mine.items()
                       if f"{key}.{k}" in trained) and any(not torch.equal(v, theirs[k]) for k, v in mine.items())
        else:
            assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    assert not (tmp_path / "swapped" / "MODEL_CARD.md").exists()


def test_flow_pool_shards_load_back_in_shard_order_with_8_bit_images(pool, tmp_path):
    """What flow_pool.py writes and `train.py --pool` reads: shards concatenated by shard number, then part (not
    file name order), sparse rows renumbered per view, images within half an 8-bit step."""
    thirds = [pool.select(torch.arange(0, 1)), pool.select(torch.arange(1, 2)), pool.select(torch.arange(2, len(pool)))]
    thirds[0].save(tmp_path / "shard_2_0.pt")        # shard 2 sorts after shard 10 as text, before it as a number
    thirds[1].save(tmp_path / "shard_2_1.pt")
    thirds[2].save(tmp_path / "shard_10.pt")
    (tmp_path / "shard_3_0.pt.tmp").write_bytes(b"a part still being written")
    loaded = Views.load_shards(tmp_path)
    assert len(loaded) == len(pool)
    assert torch.equal(loaded.coords, pool.coords) and torch.equal(loaded.dense["cameras"], pool.dense["cameras"])
    assert all(torch.equal(loaded.sparse[k], pool.sparse[k]) for k in pool.sparse)
    assert (loaded.dense["images"] - pool.dense["images"]).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(FileNotFoundError, match="flow_pool"):
        Views.load_shards(tmp_path / "empty")


def test_a_flow_trains_on_pool_parts_as_they_appear_and_logs_a_repeatable_validation_loss(pool, tmp_path,
                                                                                          monkeypatch):
    """`flow_pool.py --save-every` writes parts while `train.py --pool` trains: later parts join the pool; the
    validation loss (`--val-pool`) of unchanged weights is the same number every time, and validating does not
    disturb training (the live weights, not the EMA, continue)."""
    import json
    from pixal3d_backend.training import flow_pool

    run, parts, val = tmp_path / "run", tmp_path / "pool", tmp_path / "val"
    for stage in ("ss_vae", "shape_vae", "tex_vae"):
        _finished_stage(stage, pool, run)
    monkeypatch.setattr(flow_pool, "OBJECTS_PER_GENERATOR_BATCH", 1)
    report = flow_pool.write_shard(run, parts, 0, 1, minutes=10, device="cpu", max_batches=3, save_every=0)
    assert report["files"] == 3 and sorted(p.name for p in parts.iterdir()) == [f"shard_0_{i}.pt" for i in range(3)]
    val.mkdir()
    (parts / "shard_0_2.pt").rename(val / "shard_0.pt")
    held = parts / "shard_0_1.pt.later"
    (parts / "shard_0_1.pt").rename(held)

    trainer = train.Trainer("shape_flow", run, "cpu", overrides=TINY, log_every=1, pool_dir=parts, val_dir=val)
    first = trainer.build_pool(60, 1)
    assert len(first) == 2 and trainer.grow_pool(first) is first           # nothing new yet
    held.rename(parts / "shard_0_1.pt")
    grown = trainer.grow_pool(first)
    everything = Views.load_shards(parts)
    assert len(grown) == 4 and torch.equal(grown.coords, everything.coords)

    live = {k: v.clone() for k, v in trainer.models.state_dict().items()}
    trainer.validate()
    trainer.validate()
    assert all(torch.equal(live[k], v) for k, v in trainer.models.state_dict().items())
    trainer.run(minutes=5, resume=False, max_steps=2)
    records = [json.loads(line) for line in (run / "shape_flow" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if r.get("event") == "val"]
    assert [v["step"] for v in vals] == [0, 0, 0, 2] and all(v["views"] == 2 for v in vals)
    assert vals[0]["loss"] == vals[1]["loss"] == vals[2]["loss"] != vals[3]["loss"]
    with pytest.raises(FileNotFoundError, match="flow_pool"):
        train.Trainer("shape_flow", run, "cpu", overrides=TINY, pool_dir=tmp_path / "missing").build_pool(1, 1)


def test_a_deepened_flow_starts_as_the_flow_it_grew_from_and_trains_its_new_blocks(pool, tmp_path, monkeypatch):
    """`train.py --blocks N --encoder-layers M --init RUN`: the earlier blocks and encoder layers keep their weights,
    the new ones start as the identity, so the deepened stage's loss on a batch equals the shallow stage's; then the
    new blocks train (on minibatches of `--views-per-step`), and the weights carry the deeper configs for the export
    and later loads."""
    import json
    _finished_stage("ss_vae", pool, tmp_path)
    shallow = _trainer("ss_flow", tmp_path, monkeypatch, pool)
    shallow.run(minutes=5, resume=False, max_steps=2)
    layers = _DINO["num_hidden_layers"]
    deep = train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY, log_every=1, blocks=3,
                         encoder_layers=layers + 2, views_per_step=3)
    deep.initialise_from(tmp_path)
    flow, encoder = deep.models["sparse_structure_flow_model"], deep.models["image_cond_model_ss"]
    assert len(flow.blocks) == 3 and len(shallow.models["sparse_structure_flow_model"].blocks) == 1
    assert len(encoder.model.layer) == layers + 2
    shallow.models.load_state_dict(shallow.ema.state_dict(shallow.models))      # what the weights file holds
    batch = shallow.stage.prepare(pool.select(torch.tensor([0, 1])))
    with torch.no_grad():
        before = shallow.stage.losses(batch, torch.Generator().manual_seed(3))["loss"]
        after = deep.stage.losses(batch, torch.Generator().manual_seed(3))["loss"]
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-6), (before, after)

    deep.run(minutes=5, resume=False, max_steps=2, init=tmp_path)
    assert flow.blocks[2].mlp.mlp[-1].weight.abs().sum() > 0                     # the new blocks learn
    assert encoder.model.layer[layers + 1].mlp.down_proj.weight.abs().sum() > 0
    records = [json.loads(x) for x in (tmp_path / "ss_flow" / "log.jsonl").read_text().splitlines()]
    deepened = {r["network"]: r["new_blocks"] for r in records if r.get("event") == "deepen"}
    assert deepened == {"sparse_structure_flow_model": [1, 2], "image_cond_model_ss": [layers, layers + 1]}
    assert [r["views_per_step"] for r in records if r.get("event") == "start"][-1] == 3
    nets, _ = train.load_networks(tmp_path, "ss_flow", ["sparse_structure_flow_model", "image_cond_model_ss"], "cpu")
    assert len(nets["sparse_structure_flow_model"].blocks) == 3
    assert len(nets["image_cond_model_ss"].model.layer) == layers + 2
    with pytest.raises(ValueError, match="deepen a flow stage"):
        train.Trainer("ss_vae", tmp_path, "cpu", overrides=TINY, blocks=3)
    with pytest.raises(RuntimeError, match="does not fit"):                  # fewer blocks than the state is no deepening
        train.deepen(shallow.models["sparse_structure_flow_model"], flow.state_dict())


def test_an_absolute_position_flow_starts_from_a_rope_run_with_all_its_parameters(pool, tmp_path, monkeypatch):
    """`train.py --stage ss_flow --pe-mode ape --init RUN` from a RoPE flow: every parameter (flow and image encoder)
    carries over, the position buffer is the ape model's own, it trains, and its weights load back as an "ape" flow
    (the config travels with them to the export)."""
    _finished_stage("ss_vae", pool, tmp_path)
    _trainer("ss_flow", tmp_path, monkeypatch, pool).run(minutes=5, resume=False, max_steps=1)
    rope_state = train.load_weights(tmp_path / "ss_flow" / "weights.safetensors")[0]
    ape = train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY, log_every=1, pe_mode="ape")
    ape.initialise_from(tmp_path)
    flow = ape.models["sparse_structure_flow_model"]
    assert flow.pe_mode == "ape"
    for key, value in ape.models.state_dict().items():
        if key != "sparse_structure_flow_model.pos_emb":
            assert torch.equal(value.to(rope_state[key].dtype), rope_state[key]), key
    ape_config = stages.with_args(TINY, "sparse_structure_flow_model", pe_mode="ape")
    torch.testing.assert_close(flow.pos_emb, stages.build("sparse_structure_flow_model", ape_config).pos_emb)
    ape.run(minutes=5, resume=False, max_steps=2, init=tmp_path)
    assert ape.step == 2
    nets, _ = train.load_networks(tmp_path, "ss_flow", ["sparse_structure_flow_model"], "cpu")
    assert nets["sparse_structure_flow_model"].pe_mode == "ape"
    assert torch.equal(nets["sparse_structure_flow_model"].pos_emb, flow.pos_emb)      # stored exactly, not in fp16
    with pytest.raises(ValueError, match="sparse-structure flow"):
        train.Trainer("shape_flow", tmp_path, "cpu", overrides=TINY, pe_mode="ape")


def test_learning_rate_decays_over_the_invocation_to_the_asked_fraction(pool, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "WARMUP_STEPS", 1)
    _finished_stage("ss_vae", pool, tmp_path)
    trainer = train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY, lr_decay=0.1)
    views = trainer.stage.prepare(pool)
    rate = stages.LEARNING_RATE["ss_flow"]
    for progress, expected in ((0.0, 1.0), (0.5, 0.55), (1.0, 0.1), (1.5, 0.1)):
        trainer.lr_progress = lambda: progress
        assert trainer.train_step(views)["lr"] == pytest.approx(expected * rate)
    assert train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY).train_step(views)["lr"] == rate
    with pytest.raises(ValueError, match="final fraction"):
        train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY, lr_decay=2.0)


def test_a_dense_flow_loaded_from_a_run_keeps_its_complex_rope_phases(pool, tmp_path, monkeypatch):
    _finished_stage("ss_vae", pool, tmp_path)
    _trainer("ss_flow", tmp_path, monkeypatch, pool).run(minutes=5, resume=False, max_steps=1)
    nets, _ = train.load_networks(tmp_path, "ss_flow", ["sparse_structure_flow_model"], "cpu")
    built = stages.build("sparse_structure_flow_model", TINY)
    assert torch.equal(nets["sparse_structure_flow_model"].rope_phases, built.rope_phases)
    assert built.rope_phases.imag.abs().max() > 0.1


def test_the_implied_clean_latent_of_the_exact_velocity_is_the_latent_itself():
    """`losses.flow_matching` noises x0 as the sampler denoises it: a model that returns the exact velocity of the
    x_t it is given has zero loss, and the clean latent its velocity implies (what the structure loss decodes) is
    x0 again, at every t."""
    x0 = torch.randn(5, 8, 4, 4, 4)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t1000, cond):
            t = (t1000 / 1000).view(-1, 1, 1, 1, 1)
            s = losses.SIGMA_MIN + (1 - losses.SIGMA_MIN) * t
            eps = (x_t - (1 - t) * x0) / s
            return (1 - losses.SIGMA_MIN) * eps - x0

    cond = {"global": torch.zeros(5, 5, 4), "proj": torch.zeros(5, 64, 4)}
    fm = losses.flow_matching(Oracle(), x0, cond, "logit_normal", torch.Generator().manual_seed(3))
    assert fm.loss < 1e-8 and fm.t.shape == (5,)
    assert torch.allclose(fm.x0, x0, atol=1e-4)


def test_the_structure_loss_prefers_the_true_structure_and_leaves_pure_noise_alone(pool):
    occ = occupancy(pool.select(torch.tensor([0, 1])))
    right, wrong = 20 * (occ - 0.5), 20 * (0.5 - occ)
    t = torch.tensor([0.2, 0.3])
    assert losses.structure_loss(right, occ, t) < 0.01 < 1.0 < losses.structure_loss(wrong, occ, t)
    assert losses.structure_loss(wrong, occ, torch.ones(2)) == 0          # t = 1: weight 0


def test_a_mirrored_view_flips_its_image_and_its_structure_together_along_the_lifted_axis(pool):
    """The augmentation pairs a left-right mirrored image with the occupancy mirrored along grid x, and grid x is
    the axis the lifting maps the image's columns to (a smooth feature map lifted from the mirrored image equals
    the lifted one mirrored along x, not along y or z); recolouring keeps the black background black."""
    from pixal3d_backend.conditioning.proj_grid import dense_grid_coords, lift_features
    r, s = 16, 512
    u = torch.linspace(0, 3, 32)
    fmap = torch.stack([torch.sin(u)[None, :] + torch.cos(u)[:, None], u[None, :] * u[:, None]])[None]  # [1, 2, 32, 32]
    coords = dense_grid_coords(r)
    lifted = lambda m: lift_features(m, coords, r, s, 0.8, distance=1.4)[0].reshape(r, r, r, 2)
    a, b = lifted(fmap), lifted(fmap.flip(3))
    errors = [(a.flip(axis) - b).abs().max().item() for axis in range(3)]
    assert errors[0] < 0.05 < 0.5 < min(errors[1:]), errors

    batch = stages.flow_targets(pool, {"ss_encoder": stages.build("ss_encoder", TINY)}, {})
    images, occ = batch.dense["images"], batch.dense["occupancy"]
    new_images, new_occ = stages.mirror_and_recolour(images, occ, torch.Generator().manual_seed(1))
    flipped = []
    for k in range(len(batch)):
        mask, new_mask = images[k].amax(0) > 0, new_images[k].amax(0) > 0
        assert not torch.equal(mask, mask.flip(1))                             # a view whose mirror tells
        assert torch.equal(new_mask, mask.flip(1)) or torch.equal(new_mask, mask)
        flipped.append(torch.equal(new_mask, mask.flip(1)))
        assert torch.equal(new_occ[k], occ[k].flip(1) if flipped[-1] else occ[k])
        assert not torch.allclose(new_images[k], images[k].flip(2) if flipped[-1] else images[k])   # recoloured
    assert any(flipped) and not all(flipped)


def test_the_structure_trained_flow_optimises_both_terms_and_validates_unaugmented(pool, tmp_path):
    """`train.py --augment --structure-loss W`: the sparse-structure flow's loss is its flow term plus W times the
    structure term through the frozen SS decoder (both logged), the terms fall over steps, and validation reads the
    views as they are (the same terms at every call, not the augmented ones). Other flows refuse the options."""
    _finished_stage("ss_vae", pool, tmp_path)
    trainer = train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY, augment=True, structure_weight=0.5)
    assert "sparse_structure_decoder" in trainer.stage.frozen
    batch = trainer.stage.prepare(pool.select(torch.tensor([0, 1])))
    opt = torch.optim.Adam(trainer.models.parameters(), lr=2e-3)
    values = []
    for _ in range(6):
        terms = trainer.stage.losses(batch, torch.Generator().manual_seed(0))
        assert torch.allclose(terms["loss"], terms["flow"] + 0.5 * terms["structure"])
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        values.append(terms["loss"].item())
    assert values[-1] < values[0], values
    val = [trainer.stage.losses(batch, torch.Generator().manual_seed(4), training=False) for _ in range(2)]
    trained = trainer.stage.losses(batch, torch.Generator().manual_seed(4))
    assert val[0]["loss"] == val[1]["loss"] != trained["loss"]
    plain = train.Trainer("ss_flow", tmp_path, "cpu", overrides=TINY)   # not optimised: validation still reports it
    assert "structure" in plain.stage.losses(batch, torch.Generator().manual_seed(4), training=False)
    assert "structure" not in plain.stage.losses(batch, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="sparse-structure flow"):
        train.Trainer("shape_flow", tmp_path, "cpu", overrides=TINY, augment=True)
    without = Views(dict(batch.dense), batch.coords, batch.sparse)
    del without.dense["occupancy"]
    with pytest.raises(ValueError, match="flow_pool"):
        trainer.stage.losses(without, torch.Generator().manual_seed(0))

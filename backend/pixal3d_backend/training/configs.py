"""The default model: small configs of the official classes, the data settings and the training plan.

Single-stage cascade (TRELLIS.2's 512 pipeline; spec §1.2 without the HR stage):

    SS flow on the 16^3 x 8 latent -> SS decoder -> 64^3 logits -> max-pool -> occupied 32^3 tokens
    shape flow on the tokens -> texture flow on [noise | normalised shape latent]
    shape decoder (3 C2S stages: 32 -> 256) -> flexible-dual-grid mesh; texture decoder on its voxels

Why 256 and not 512 (4 C2S stages): the decoded voxels and the mesh faces grow with res^2. Our objects have
~170 k flexible-dual-grid voxels at 256 on average (measured, ~2.6 k tokens at 32^3) and would have ~680 k at
512; on a CPU laptop the 512 decode (torch sparse conv at the finest stage, meshing, then remesh/bake in the
exporter, all linear in voxels/faces) would take most of the 60 s budget, and the data engine's targets (QEF +
split-weight fit per voxel) and the VAE steps would cost 4x per sample on the GPU.

Every `{"name", "args"}` below is what `ckpts/<name>.json` holds, built by `models.build_model` (networks
that ship) or `training.encoders.ENCODERS` (the VAE encoders, used only for training).
"""
from __future__ import annotations

SS_LATENT_RESOLUTION = 16     # dense structure latent 16^3 x 8 (official)
SS_RESOLUTION = 64            # SS decoder output (official); max-pooled to the 32^3 token grid
TOKEN_RESOLUTION = 32         # shape / texture latent grid (official LR grid)
SHAPE_RESOLUTION = 256        # decoded voxels: 32 * 2^3
IMAGE_SIZE = 512              # conditioning image; 32 x 32 patch map = the token grid
SHAPE_LATENT = 16
TEX_LATENT = 16

_DINO = {"hidden_size": 192, "intermediate_size": 576, "num_hidden_layers": 4, "num_attention_heads": 3,
         "patch_size": 16, "image_size": IMAGE_SIZE, "num_register_tokens": 4, "rope_theta": 100.0}
COND_CHANNELS = _DINO["hidden_size"]


def image_encoder(grid_resolution: int) -> dict:
    """A small DINOv3 trained from scratch with its flow; no NAF (the 32^2 patch map already matches the
    token grid), so the lifted features are the patch map alone (proj channels = hidden size)."""
    return {"name": "DinoV3ProjFeatureExtractor",
            "args": {"image_size": IMAGE_SIZE, "grid_resolution": grid_resolution, "use_naf_upsample": False,
                     "dinov3_config": dict(_DINO)}}


def _flow(name: str, resolution: int, in_channels: int, out_channels: int, channels: int, blocks: int) -> dict:
    return {"name": name, "args": {
        "resolution": resolution, "in_channels": in_channels, "out_channels": out_channels,
        "model_channels": channels, "cond_channels": COND_CHANNELS, "proj_in_channels": COND_CHANNELS,
        "num_blocks": blocks, "num_heads": channels // 64, "mlp_ratio": 4, "pe_mode": "rope",
        "rope_freq": [1.0, 10000.0], "share_mod": True, "qk_rms_norm": True, "qk_rms_norm_cross": True,
        "initialization": "scaled", "image_attn_mode": "proj", "dtype": "float32"}}


def _sparse_decoder(name: str, channels: list[int], blocks: list[int], extra: dict) -> dict:
    n = len(channels)
    return {"name": name, "args": {
        "model_channels": channels, "num_blocks": blocks, "block_type": ["SparseConvNeXtBlock3d"] * n,
        "up_block_type": ["SparseResBlockC2S3d"] * (n - 1), "use_fp16": False, **extra}}


# pipeline key -> config, for everything that ships in the snapshot
MODELS: dict[str, dict] = {
    "sparse_structure_flow_model": _flow("SparseStructureFlowModel", SS_LATENT_RESOLUTION, 8, 8, 128, 3),
    "sparse_structure_decoder": {"name": "SparseStructureDecoder", "args": {
        "out_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "num_res_blocks_middle": 1,
        "channels": [64, 32, 16], "norm_type": "layer", "use_fp16": False}},
    "shape_slat_flow_model_512": _flow("SLatFlowModel", TOKEN_RESOLUTION, SHAPE_LATENT, SHAPE_LATENT, 256, 5),
    "tex_slat_flow_model_512": _flow("SLatFlowModel", TOKEN_RESOLUTION, SHAPE_LATENT + TEX_LATENT, TEX_LATENT, 192, 4),
    "shape_slat_decoder": _sparse_decoder("FlexiDualGridVaeDecoder", [128, 64, 32, 16], [2, 2, 1, 0],
                                          {"resolution": SHAPE_RESOLUTION, "latent_channels": SHAPE_LATENT}),
    "tex_slat_decoder": _sparse_decoder("SparseUnetVaeDecoder", [96, 48, 24, 12], [1, 1, 1, 0],
                                        {"out_channels": 6, "latent_channels": TEX_LATENT, "pred_subdiv": False}),
    "image_cond_model_ss": image_encoder(SS_LATENT_RESOLUTION),
    "image_cond_model_shape_512": image_encoder(TOKEN_RESOLUTION),
    "image_cond_model_tex_512": image_encoder(TOKEN_RESOLUTION),
}

# training-only encoders (mirror images of the decoders above)
ENCODER_MODELS: dict[str, dict] = {
    "ss_encoder": {"name": "SparseStructureEncoder", "args": {
        "in_channels": 1, "latent_channels": 8, "num_res_blocks": 1, "num_res_blocks_middle": 1,
        "channels": [16, 32, 64]}},
    "shape_encoder": {"name": "FlexiDualGridVaeEncoder", "args": {
        "model_channels": [16, 32, 64, 128], "num_blocks": [0, 1, 2, 2], "latent_channels": SHAPE_LATENT}},
    "tex_encoder": {"name": "SparseUnetVaeEncoder", "args": {
        "in_channels": 6, "model_channels": [12, 24, 48, 96], "num_blocks": [0, 1, 1, 1],
        "latent_channels": TEX_LATENT}},
}

# Sampler parameters written to pipeline.json: the official per-stage values (sampler.STAGE_DEFAULTS).
# H200 minutes per stage (documented default split of the ~25 min budget): the VAEs converge fast on
# procedural data, the flows (trained from scratch with their image encoders) get the rest, most for shape.
# Three device commands of 8.5 min each: [ss_vae, shape_vae, tex_vae], [shape_flow], [ss_flow, tex_flow].
PLAN_MINUTES: dict[str, float] = {"ss_vae": 2.0, "shape_vae": 4.0, "tex_vae": 2.5,
                                  "ss_flow": 3.5, "shape_flow": 8.5, "tex_flow": 5.0}
STAGES = tuple(PLAN_MINUTES)

# Generation options the bundled model ships with (pipeline.json "default_options", read by loading.load_model):
# sized for a CPU-only machine. 50k faces and 1024^2 maps hold what a 256^3 decode resolves; the normal map needs
# the closest-point index over the full decoded mesh, the slowest export step on a CPU, so it is opt-in.
# 6 sampler steps per stage instead of the official 12: half the sampling on a CPU for the same geometry (29
# held-out objects on the H200 at these export settings, 2026-11-22: 6 vs 8 steps IoU 0.774 vs 0.772, F@0.05
# visible 0.615 vs 0.610; 8 vs 12 measured equal before; BENCHMARKS.md). Requests that name their steps keep them.
DEFAULT_OPTIONS = {"face_target": 50_000, "texture_size": 1024, "remesh": True, "normal_map": False,
                   "ss_steps": 6, "shape_steps": 6, "tex_steps": 6}

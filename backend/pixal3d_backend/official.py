"""Facts about the official Pixal3D release that are not in its snapshot files (spec §1.1, §1.4, §4).

The snapshot's `pipeline.json` and `ckpts/*.json` are the source of truth for a real snapshot; this module holds
what the official *scripts* hard-code (the four image-conditioning extractors) and the full-size checkpoint configs,
which `pixal3d bench` uses to build the architecture with random weights when no snapshot is given.
"""
from __future__ import annotations

# The four DinoV3ProjFeatureExtractor instances of inference.py/app.py (spec §1.4). They all load the same DINOv3
# weights; the HR extractors' grid resolution is overridden by the cascade's G at run time.
ENCODER_STAGES = {
    "image_cond_model_ss": {"image_size": 512, "grid_resolution": 16, "use_naf_upsample": False},
    "image_cond_model_shape_512": {"image_size": 512, "grid_resolution": 32, "use_naf_upsample": True,
                                   "naf_target_size": 512},
    "image_cond_model_shape_1024": {"image_size": 1024, "grid_resolution": 64, "use_naf_upsample": True,
                                    "naf_target_size": 512},
    "image_cond_model_tex_1024": {"image_size": 1024, "grid_resolution": 64, "use_naf_upsample": True,
                                  "naf_target_size": 1024},
}

# DINOv3 ViT-L/16 (facebook/dinov3-vitl16-pretrain-lvd1689m) architecture, for building it with random weights.
DINOV3_VITL16_CONFIG = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_register_tokens": 4, "patch_size": 16, "image_size": 224, "rope_theta": 100.0, "layerscale_value": 1e-5,
    "layer_norm_eps": 1e-5, "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True,
    "mlp_bias": True, "use_gated_mlp": False, "hidden_act": "gelu", "pos_embed_rescale": 2.0,
}

_DIT = {"model_channels": 1536, "cond_channels": 1024, "num_blocks": 30, "num_heads": 12, "mlp_ratio": 5.3334,
        "pe_mode": "rope", "share_mod": True, "initialization": "scaled", "qk_rms_norm": True,
        "qk_rms_norm_cross": True, "image_attn_mode": "proj", "dtype": "bfloat16"}
_VAE = {"model_channels": [1024, 512, 256, 128, 64], "latent_channels": 32, "num_blocks": [4, 16, 8, 4, 0],
        "block_type": ["SparseConvNeXtBlock3d"] * 5, "up_block_type": ["SparseResBlockC2S3d"] * 4,
        "use_fp16": True}

# pipeline key -> (checkpoint name, {"name", "args"}) of the 7 released checkpoints (parity manifests agree).
CHECKPOINTS = {
    "sparse_structure_flow_model": ("ss_flow_img_dit_1_3B_64_bf16", {
        "name": "SparseStructureFlowModel", "args": {"resolution": 16, "in_channels": 8, "out_channels": 8, **_DIT}}),
    "sparse_structure_decoder": ("ss_dec_conv3d_16l8_fp16", {
        "name": "SparseStructureDecoder", "args": {"out_channels": 1, "latent_channels": 8, "num_res_blocks": 2,
                                                   "num_res_blocks_middle": 2, "channels": [512, 128, 32],
                                                   "norm_type": "layer", "use_fp16": True}}),
    "shape_slat_flow_model_512": ("slat_flow_img2shape_dit_1_3B_512_bf16", {
        "name": "ElasticSLatFlowModel", "args": {"resolution": 32, "in_channels": 32, "out_channels": 32,
                                                 "proj_in_channels": 2048, **_DIT}}),
    "shape_slat_flow_model_1024": ("slat_flow_img2shape_dit_1_3B_1024_bf16", {
        "name": "ElasticSLatFlowModel", "args": {"resolution": 64, "in_channels": 32, "out_channels": 32,
                                                 "proj_in_channels": 2048, **_DIT}}),
    "shape_slat_decoder": ("shape_dec_next_dc_f16c32_fp16", {
        "name": "FlexiDualGridVaeDecoder", "args": {"resolution": 256, **_VAE}}),
    "tex_slat_flow_model_1024": ("slat_flow_imgshape2tex_dit_1_3B_1024_bf16", {
        "name": "ElasticSLatFlowModel", "args": {"resolution": 64, "in_channels": 64, "out_channels": 32,
                                                 "proj_in_channels": 2048, **_DIT}}),
    "tex_slat_decoder": ("tex_dec_next_dc_f16c32_fp16", {
        "name": "SparseUnetVaeDecoder", "args": {"out_channels": 6, "pred_subdiv": False, **_VAE}}),
}

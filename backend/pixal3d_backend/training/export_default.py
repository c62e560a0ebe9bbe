"""Write a trained run as the bundled default model: an official-layout snapshot plus its model card.

    python -m pixal3d_backend.training.export_default --run runs/default --eval eval.json \
        [--out backend/pixal3d_backend/default_model]
    python -m pixal3d_backend.training.export_default --base backend/pixal3d_backend/default_model \
        --replace runs/variant/ss_flow/weights.safetensors --out /tmp/variant_model

The second form writes a copy of a snapshot with the networks of one stage's weights in place of its own (a
variant trained from the snapshot, to evaluate beside it); the card is not carried over.

Snapshot (loaded by `loading.Snapshot`, every checkpoint strictly):

    pipeline.json        {"name", "args": {"models", the three samplers, shape/tex normalisation, ...}} plus our
                         keys: "cascade" (single-stage 512 cascade), "decoded_resolution", "image_cond_models"
    ckpts/<name>.json    {"name": <official class>, "args": ...}: the config each network was trained with
    ckpts/<name>.safetensors   the stages' EMA weights as trained stored them, in fp16 (the networks run in fp32
                         after the loader's cast; fp16 storage halves the size, the round-off is ~1e-3 relative)
    MODEL_CARD.md        generated from the runs' logs and the evaluation results; nothing is filled in by hand

The DINOv3 blocks are written under their official names `model.layer.*` whatever transformers version
trained them (5.x nests them as `model.model.layer.*`).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..sampler import STAGE_DEFAULTS
from .configs import DEFAULT_OPTIONS
from .losses import SIGMA_MIN
from .stages import trained_keys
from .train import load_weights, prefixed

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "default_model"
MAX_BYTES = 50 * 1024 * 1024
CKPT_NAMES = {
    "sparse_structure_flow_model": "ss_flow_img_dit_small_16",
    "sparse_structure_decoder": "ss_dec_conv3d_small_16l8",
    "shape_slat_flow_model_512": "slat_flow_img2shape_dit_small_512",
    "tex_slat_flow_model_512": "slat_flow_imgshape2tex_dit_small_512",
    "shape_slat_decoder": "shape_dec_fdg_small_256",
    "tex_slat_decoder": "tex_dec_small_256",
    "image_cond_model_ss": "dinov3_small_ss",
    "image_cond_model_shape_512": "dinov3_small_shape_512",
    "image_cond_model_tex_512": "dinov3_small_tex_512",
}
SAMPLERS = {"sparse_structure_sampler": "sparse_structure", "shape_slat_sampler": "shape",
            "tex_slat_sampler": "texture"}
SHIPPING_STAGES = ("ss_vae", "shape_vae", "tex_vae", "ss_flow", "shape_flow", "tex_flow")


def official_names(key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv3 blocks under their official (transformers 4.x) names; every other key unchanged."""
    if not key.startswith("image_cond_model"):
        return tensors
    nested = "model.model.layer."
    return {("model.layer." + k[len(nested):]) if k.startswith(nested) else k: v for k, v in tensors.items()}


def pipeline_json(normalization: dict, decoded_resolution: int) -> dict:
    return {"name": "Pixal3DImageTo3DPipeline", "args": {
        "models": {key: f"ckpts/{name}" for key, name in CKPT_NAMES.items()},
        **{k: {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": SIGMA_MIN},
               "params": {p: list(v) if isinstance(v, tuple) else v for p, v in STAGE_DEFAULTS[stage].items()}}
           for k, stage in SAMPLERS.items()},
        "shape_slat_normalization": normalization["shape"],
        "tex_slat_normalization": normalization["tex"],
        "default_pipeline_type": "512",
        "default_options": DEFAULT_OPTIONS,
        "cascade": "single_stage_512",
        "decoded_resolution": decoded_resolution,
        "image_cond_models": {"sparse_structure": "image_cond_model_ss", "shape": "image_cond_model_shape_512",
                              "texture": "image_cond_model_tex_512"},
    }}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_phases(log: list[dict]) -> list[list[dict]]:
    """The log split into phases: a phase starts at every start that does not resume (a fresh stage, or a
    fine-tune from earlier weights with `--init`), and its step counter restarts at 0."""
    phases: list[list[dict]] = []
    for record in log:
        if record.get("event") == "start" and not record.get("resumed") or not phases:
            phases.append([])
        phases[-1].append(record)
    return phases


def stage_summary(run: Path, stage: str) -> dict:
    """Steps, train time and pool size (summed over the training phases), hardware and the mean of the last
    logged losses of one stage."""
    phases = training_phases(read_log(run / stage / "log.jsonl"))
    steps = [[r for r in phase if "event" not in r] for phase in phases]
    if not all(steps):
        raise ValueError(f"{run / stage / 'log.jsonl'} has a training phase without logged steps")
    starts = [r for phase in phases for r in phase if r.get("event") == "start"]
    pools = [[r for r in phase if r.get("event") == "pool"][-1]["views"] for phase in phases]
    tail = steps[-1][-4:]
    losses = {k: sum(r[k] for r in tail) / len(tail) for k in tail[-1]
              if k not in ("stage", "step", "seconds", "lr", "grad_norm")}
    return {"steps": sum(s[-1]["step"] for s in steps), "seconds": sum(s[-1]["seconds"] for s in steps),
            "views_per_step": starts[-1]["views_per_step"], "pool_views": " + ".join(map(str, pools)),
            "device": starts[-1]["device"], "torch": starts[-1]["torch"], "phases": len(phases),
            "invocations": len(starts), "final_losses": losses}


def model_card(run: Path, evaluation: dict, models: dict[str, dict], sizes: dict[str, tuple[int, int]]) -> str:
    summaries = {s: stage_summary(run, s) for s in SHIPPING_STAGES}
    dino, resolution = models["image_cond_model_ss"]["args"], models["shape_slat_decoder"]["args"]["resolution"]
    hardware = sorted({f"{s['device']} (torch {s['torch']})" for s in summaries.values()})
    lines = [
        "# Pixal3D default model (small, procedural data)", "",
        "Generated by `pixal3d_backend.training.export_default` from the training logs and the evaluation "
        "results; do not edit by hand.", "",
        "## Model", "",
        "Same classes as the official Pixal3D / TRELLIS.2 release with small configs, single-stage cascade: sparse "
        f"structure (16^3 x 8 latent -> 64^3 -> 32^3 tokens), shape and texture flows on the 32^3 tokens, decoders "
        f"to {resolution}^3 flexible-dual-grid voxels. Each flow has its own small DINOv3 "
        f"({dino['dinov3_config']['num_hidden_layers']} layers, width {dino['dinov3_config']['hidden_size']}, "
        f"image {dino['image_size']} px, no NAF) trained from scratch with it.", "",
        "| network | class | parameters | file MB |", "|---|---|---:|---:|",
        *[f"| `{k}` | {models[k]['name']} | {sizes[k][0]:,} | {sizes[k][1] / 2**20:.1f} |" for k in CKPT_NAMES],
        f"| total | | {sum(v[0] for v in sizes.values()):,} | {sum(v[1] for v in sizes.values()) / 2**20:.1f} |", "",
        "## Data", "",
        "Procedural SDF objects from the `pixal3d_backend.data` grammar (train seeds only; the evaluation seeds "
        "are disjoint), each rendered from 2 random views (FOV 10-70 degrees) with PBR shading, the object posed "
        "in the camera frame as in the official training data. Targets: flexible-dual-grid voxels at "
        f"{resolution}^3 and PBR voxel attributes; the sparse structure is their 64^3 occupancy.", "",
        "Phases: a stage's later phase starts from the weights of the earlier one (`train.py --init`) with a new "
        "optimiser. The flows' first phase saw whole renders at their own FOV; their second phase sees crop views "
        "(`data.views.crop_view`): the crop of 1.1x the object's box at the crop's FOV and the 'object fills the "
        "frame' distance, which is the camera relation inference builds from an image. A VAE's later phases train "
        "its decoder alone on the first phase's frozen encoder (`train.py --freeze-encoder`), so the latents the "
        "flows learnt stay valid; the texture VAE's third phase trained encoder and decoder together (its latents "
        "carried almost no colour), its fourth the decoder alone, while the texture flow learnt the new latents. "
        "The last four flow phases trained while their pool was being generated (`flow_pool.py --save-every`), "
        "with a loss on held-out views (`train.py --val-pool`) that fell throughout; in the last two the learning "
        "rate fell linearly to a tenth over the phase (`train.py --lr-decay 0.1`), as did the texture decoder's "
        "fifth phase.", "",
        "## Training", "",
        f"Hardware: {', '.join(hardware)}. AdamW, bf16 autocast, EMA 0.999; each stage trains on a pool of "
        "generated views.", "",
        "| stage | phases | steps | views/step | pool views | train s | invocations | final losses (mean of last logs) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {s} | {v['phases']} | {v['steps']} | {v['views_per_step']} | {v['pool_views']} | {v['seconds']:.0f} | "
          f"{v['invocations']} | " + ", ".join(f"{k} {x:.4g}" for k, x in v["final_losses"].items()) + " |"
          for s, v in summaries.items()], "",
        "## Evaluation", "",
        f"Command: `{evaluation['command']}`", "",
        "| metric | value |", "|---|---:|",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation["metrics"].items()],
        "",
        "## Limitations", "",
        "Trained for minutes on procedural objects only: expect coarse geometry and flat textures on real photos, "
        "thin parts and concavities that the 32^3 tokens and the 256^3 decoder cannot resolve, and no knowledge of "
        "real object categories. Colours are often wrong (masked PSNR ~11 dB on albedo). The sparse structure is "
        "the weakest stage: given the true structure, the same flows score F@0.05 ~0.97 on held-out objects, so "
        "depth errors come from it. It exists so that the product works offline; use the official weights for "
        "quality.", "",
    ]
    return "\n".join(lines)


def export(run: Path, evaluation: dict | None, out: Path = DEFAULT_DIR) -> Path:
    """Writes the snapshot into `out` (replacing its files), and the model card when `evaluation` is given (the
    evaluation needs the snapshot: export, `pixal3d eval`, then export again with its results); returns `out`."""
    weights, models, normalization = {}, {}, {}
    for stage in SHIPPING_STAGES:
        tensors, meta = load_weights(run / stage / "weights.safetensors")
        normalization.update(meta["normalization"])
        for key in trained_keys(stage):
            if key in CKPT_NAMES:
                weights[key] = prefixed(tensors, key)
                models[key] = meta["configs"][key]
    (out / "ckpts").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for key in CKPT_NAMES:
        path = write_checkpoint(out, key, models[key], weights[key])
        sizes[key] = (sum(t.numel() for t in weights[key].values() if t.is_floating_point()), path.stat().st_size)
    total = sum(s for _, s in sizes.values())
    if total > MAX_BYTES:
        raise ValueError(f"the default model is {total / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB budget")
    (out / "pipeline.json").write_text(json.dumps(pipeline_json(normalization, models["shape_slat_decoder"]["args"]["resolution"]), indent=2) + "\n")
    if evaluation is not None:
        (out / "MODEL_CARD.md").write_text(model_card(run, evaluation, models, sizes))
    return out


def write_checkpoint(out: Path, key: str, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """ckpts/<name>.json and .safetensors of network `key` in the snapshot folder `out`."""
    name = CKPT_NAMES[key]
    (out / "ckpts" / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")
    path = out / "ckpts" / f"{name}.safetensors"
    save_file(official_names(key, tensors), str(path))
    return path


def replace_networks(base: Path, weights: Path, out: Path) -> list[str]:
    """A copy of snapshot `base` in `out` with every network of the stage weights `weights` (a training run's
    `<stage>/weights.safetensors`) replacing the snapshot's; returns the replaced keys."""
    tensors, meta = load_weights(weights)
    keys = [k for k in trained_keys(meta["stage"]) if k in CKPT_NAMES]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("MODEL_CARD.md"))
    for key in keys:
        write_checkpoint(out, key, meta["configs"][key], prefixed(tensors, key))
    return keys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=Path, help="the --out folder of training.train")
    what.add_argument("--base", type=Path, help="a snapshot to copy, with the networks of --replace in it")
    p.add_argument("--replace", type=Path, help="with --base: a stage's weights.safetensors")
    p.add_argument("--eval", type=Path, help='JSON {"command": "<the pixal3d eval command>", "metrics": {...}}; '
                   'without it only the snapshot is written (evaluate it, then export again for the card)')
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = p.parse_args(argv)
    if args.base is not None:
        if args.replace is None or args.eval is not None:
            p.error("--base takes --replace and --out, not --eval")
        if args.out.resolve() == DEFAULT_DIR.resolve():
            p.error("--base writes a variant: give it its own --out")
        print(args.out, "with", ", ".join(replace_networks(args.base, args.replace, args.out)), "replaced")
        return
    evaluation = json.loads(args.eval.read_text()) if args.eval else None
    if evaluation is not None and (not evaluation.get("metrics") or not evaluation.get("command")):
        raise SystemExit(f"{args.eval} needs a non-empty 'metrics' and the 'command' that produced them")
    print(export(args.run, evaluation, args.out))


if __name__ == "__main__":
    main()

"""Train the default model, stage by stage, within a wall-clock budget; resumable and bit-exact on resume.

    python -m pixal3d_backend.training.train --stage all --minutes 25 --out runs/default
    python -m pixal3d_backend.training.train --stage ss_vae shape_vae tex_vae --minutes 8.5 --out DIR --resume
    python -m pixal3d_backend.training.train --stage shape_flow --minutes 9 --out DIR --init OLD_RUN

`--minutes` is this invocation's budget, shared by the listed stages in proportion to `configs.PLAN_MINUTES`
(the documented 25-minute H200 split). Per stage, `DIR/<stage>/` holds:

    state.pt              everything needed to continue (weights, EMA, AdamW, step, pool size); atomic writes
    weights.safetensors   the EMA weights of the stage's networks in fp16 (what later stages and the export read;
                          small enough to come back from a device run), with the networks' configs and the
                          latent normalisation of the shape/texture VAEs in its metadata
    log.jsonl             one JSON object per line: pool generation, losses every `log_every` steps, checkpoints

A stage first generates a pool of views (up to `POOL_FRACTION` of its budget), then trains on random
minibatches of it: AdamW, linear warm-up, gradient clipping, EMA, bf16 autocast on CUDA. Step k draws its
minibatch, noise, timesteps and dropout from a CPU generator seeded by (seed, k), so a resumed run continues
bit-identically (on one device type). Checkpoints are written every `--checkpoint-minutes` and at the end.

Flows can instead train on a pool that `flow_pool.py` writes (`--pool`); while it is still being written
(`flow_pool.py --save-every`) the new shard files join the pool as they appear. `--val-pool` (views no training
step sees: a `flow_pool.py` folder of other generator batches) logs the EMA weights' loss on it at the start, at
every checkpoint and at the end, with the same noise and timesteps every time, so the numbers are comparable
across checkpoints and runs.

Two fine-tuning options: `--lr-decay F` lowers the learning rate linearly over the invocation's wall clock, to F
times its rate at the end (the schedule follows the clock, so such a run is not bit-exact on resume);
`--blocks N` deepens a flow stage's transformer to N blocks and `--encoder-layers N` its image encoder (DINOv3) to N
layers, starting from an `--init` with fewer: the earlier blocks keep their weights and the new ones start as the
identity (`deepen`), so training resumes from the same function with more capacity. `--views-per-step N` trains on
larger (or smaller) minibatches than the stage's default; the validation loss keeps the default's chunks, so its
numbers stay comparable across runs. For the sparse-structure flow, `--augment` trains on mirrored and recoloured
views and `--structure-loss W` adds an occupancy loss through the frozen SS decoder (`stages.FlowStage`); its
validation logs the latent term ("flow") and the structure term apart, so variants compare on both. `--pe-mode`
sets how that flow sees grid positions (`models.flow_dit`: RoPE, or absolute embeddings, "ape").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..loading import load_model
from . import configs
from .batches import ViewGenerator, Views, generate_pool, shape_inputs, shard_files, texture_inputs
from .stages import (DEPENDS, LEARNING_RATE, STAGE_CLASSES, VIEWS_PER_STEP, build, stage_config, trained_keys,
                     with_args)

# Share of a stage's first run that may generate its pool. Measured on the H200 (single process): ~8 views/s of
# flexible-dual-grid targets, ~3 views/s with 512 px renders; the flows need images and are data-bound.
POOL_FRACTION = {"ss_vae": 0.3, "shape_vae": 0.3, "tex_vae": 0.3, "ss_flow": 0.5, "shape_flow": 0.5, "tex_flow": 0.5}
OBJECTS_PER_GENERATOR_BATCH = 4
WARMUP_STEPS = 200
POOL_POLL_SECONDS = 20      # how often a flow looks for new shard files of a pool that is still being written
VAL_SEED = 7_777
EMA_DECAY = 0.999
GRAD_CLIP = 1.0
POSITION_BUFFERS = ("rope_phases", "pos_emb")     # a dense flow's grid positions (RoPE, or "ape" embeddings)


class EMA:
    """Exponential moving average of parameters, decay min(EMA_DECAY, (1 + n) / (10 + n)) at update n."""

    def __init__(self, module: torch.nn.Module):
        self.params = {k: p.detach().clone().float() for k, p in module.named_parameters()}

    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in module.named_parameters():
                self.params[k].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state_dict with the averaged parameters in place of the live ones."""
        return {k: self.params.get(k, v) for k, v in module.state_dict().items()}


def half(name: str, t: torch.Tensor) -> torch.Tensor:
    """fp16 storage of a floating tensor; refuses values fp16 cannot hold. Complex buffers and position buffers are
    kept as they are: they are computed from the config, and a rounded copy would not be what the flow trained with."""
    if not t.is_floating_point() or name.split(".")[-1] in POSITION_BUFFERS:
        return t.contiguous()
    h = t.half()
    if not torch.isfinite(h).all():
        raise ValueError(f"{name} does not fit in fp16")
    return h.contiguous()


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("pixal3d", "{}"))


def prefixed(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """The entries `<key>.<name>` of a stage's weights as a state_dict of network `key`."""
    return {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}


def trainable_state(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """Network `key`'s state_dict from a stage's (fp16) weights, in fp32; complex buffers (a dense flow's RoPE
    phases) stay complex, since casting them to float would drop their imaginary part."""
    return {k: v.float() if v.is_floating_point() else v for k, v in prefixed(tensors, key).items()}


def load_network(module: torch.nn.Module, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Network `key` of a stage's (fp16) weights into a trainable fp32 module, strictly."""
    module.load_state_dict(trainable_state(tensors, key))


def load_networks(out: Path, stage: str, keys, device, overrides=None) -> tuple[dict, dict]:
    """Networks `keys` of a finished stage, with its EMA weights (strict), and the stage's metadata. The networks
    are built from the configs the weights were saved with (`overrides` for weights without them)."""
    tensors, meta = load_weights(out / stage / "weights.safetensors")
    configs_saved = {**(overrides or {}), **meta.get("configs", {})}
    nets = {}
    for key in keys:
        net = build(key, configs_saved)
        load_network(net, tensors, key)
        nets[key] = net.to(device).eval().requires_grad_(False)
    return nets, meta


def residual_blocks(module: torch.nn.Module) -> tuple[str, torch.nn.ModuleList, Callable]:
    """(state-dict prefix, blocks, block -> the output layers of its residual branches) of a flow transformer or
    of an image encoder's DINOv3 (whose layer scales multiply the branches after those layers)."""
    if hasattr(module, "blocks"):
        return "blocks.", module.blocks, lambda b: (b.self_attn.to_out, b.cross_attn.cross_attn_block.to_out,
                                                    b.cross_attn.proj_linear, b.mlp.mlp[-1])
    return module.layer_keys, module.dinov3_layers, lambda layer: (layer.attention.o_proj, layer.mlp.down_proj)


def deepen(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[int]:
    """Loads a flow transformer's or image encoder's `state` with fewer blocks into `module` (more blocks, same
    everything else) and makes each block the state lacks an identity map: every residual branch's output layer
    starts at zero, so the deepened network computes what the state's network computes. Returns the indices of
    the new blocks (none: a strict load). A dense flow's position buffer is the module's own (a function of its
    config), so a flow trained with RoPE can start one with absolute position embeddings (`--pe-mode ape`): every
    parameter carries over, only how positions enter changes."""
    prefix, blocks, outputs = residual_blocks(module)
    if hasattr(module, "checkpoint_keys"):     # an image encoder: the state's block names as the module has them
        state = dict(state)
        module.checkpoint_keys(state)
    else:
        own = module.state_dict()
        state = {**{k: v for k, v in state.items() if k not in POSITION_BUFFERS},
                 **{k: own[k] for k in POSITION_BUFFERS if k in own}}
    index = lambda k: int(k[len(prefix):].split(".")[0])
    have = {index(k) for k in state if k.startswith(prefix)}
    new = [i for i in range(len(blocks)) if i not in have]
    result = module.load_state_dict(state, strict=False)
    unexplained = [k for k in result.missing_keys if not (k.startswith(prefix) and index(k) in new)]
    if result.unexpected_keys or unexplained:      # anything but whole new blocks: a strict load's error
        raise RuntimeError(f"state does not fit {type(module).__name__}: unexpected keys {result.unexpected_keys}, "
                           f"missing keys {unexplained}")
    with torch.no_grad():
        for i in new:
            for layer in outputs(blocks[i]):
                layer.weight.zero_()
                layer.bias.zero_()
    return new


def dependencies(out: Path, stage: str, device, overrides=None) -> tuple[dict, dict]:
    """Frozen encoders and latent normalisation a flow stage needs from the VAE stages; the sparse-structure flow
    also gets the SS decoder when the ss_vae weights hold it (its structure loss decodes through it)."""
    frozen, normalization = {}, {}
    for dep in DEPENDS[stage]:
        keys = [trained_keys(dep)[0]]
        if stage == "ss_flow":
            with safe_open(str(out / dep / "weights.safetensors"), framework="pt") as f:
                if any(k.startswith("sparse_structure_decoder.") for k in f.keys()):
                    keys.append("sparse_structure_decoder")
        nets, meta = load_networks(out, dep, keys, device, overrides)
        frozen.update(nets)
        normalization.update(meta.get("normalization", {}))
    return frozen, normalization


@torch.no_grad()
def latent_statistics(encoder, pool: Views, inputs, chunk: int = 8) -> dict:
    """Per-channel mean and std of the posterior means over the pool (pipeline.json's normalisation)."""
    feats = torch.cat([encoder(inputs(pool.select(torch.arange(i, min(i + chunk, len(pool))))))[0].feats.float()
                       for i in range(0, len(pool), chunk)])
    return {"mean": feats.mean(0).tolist(), "std": feats.std(0).tolist()}


class Trainer:
    def __init__(self, stage: str, out: Path, device: str, seed: int = 0, workers: int = 0,
                 overrides: dict | None = None, log_every: int = 25, checkpoint_minutes: float = 3.0,
                 pool_dir: Path | None = None, freeze_encoder: bool = False, val_dir: Path | None = None,
                 blocks: int | None = None, lr_decay: float | None = None, encoder_layers: int | None = None,
                 views_per_step: int | None = None, augment: bool = False, structure_weight: float = 0.0,
                 pe_mode: str | None = None):
        if freeze_encoder and stage not in ("shape_vae", "tex_vae", "ss_vae"):
            raise ValueError(f"freeze_encoder is for VAE stages, not {stage}")
        if (augment or structure_weight) and stage != "ss_flow":
            raise ValueError(f"augment and structure_weight are for the sparse-structure flow, not {stage}")
        if (blocks is not None or encoder_layers is not None) and not stage.endswith("_flow"):
            raise ValueError(f"blocks and encoder_layers deepen a flow stage's networks; {stage} is not one")
        if pe_mode is not None:
            if stage != "ss_flow":
                raise ValueError(f"pe_mode chooses the dense sparse-structure flow's positions, not {stage}'s")
            overrides = with_args(overrides, "sparse_structure_flow_model", pe_mode=pe_mode)
        if blocks is not None:
            overrides = with_args(overrides, trained_keys(stage)[0], num_blocks=blocks)
        if encoder_layers is not None:
            key = trained_keys(stage)[1]
            dino = {**stage_config(key, overrides)["args"]["dinov3_config"], "num_hidden_layers": encoder_layers}
            overrides = with_args(overrides, key, dinov3_config=dino)
        self.views_per_step = views_per_step or VIEWS_PER_STEP[stage]
        if lr_decay is not None and not 0.0 <= lr_decay <= 1.0:
            raise ValueError(f"lr_decay is the final fraction of the learning rate, in [0, 1]: {lr_decay}")
        self.lr_decay, self.lr_progress = lr_decay, lambda: 0.0
        self.name, self.dir, self.device = stage, out / stage, torch.device(device)
        self.freeze_encoder = freeze_encoder
        self.seed, self.workers, self.log_every, self.pool_dir = seed, workers, log_every, pool_dir
        self.pool_files: set[str] = set()
        self.val = Views.load_shards(val_dir, device) if val_dir is not None else None
        self.checkpoint_seconds = 60 * checkpoint_minutes
        self.dir.mkdir(parents=True, exist_ok=True)
        frozen, normalization = dependencies(out, stage, self.device, overrides)
        torch.manual_seed(seed)                                   # initial weights
        options = {"augment": augment, "structure_weight": structure_weight} if stage == "ss_flow" else {}
        self.stage = STAGE_CLASSES[stage](stage, frozen, normalization, overrides, **options)
        self.models = self.stage.models.to(self.device)
        self.optimizer = torch.optim.AdamW(self.models.parameters(), lr=LEARNING_RATE[stage], betas=(0.9, 0.99),
                                           weight_decay=0.01)
        self.ema = EMA(self.models)
        self.step, self.seconds, self.pool_batches = 0, 0.0, None
        self.overrides, self.normalization = overrides, {}

    # -- state ------------------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"step": self.step, "seconds": self.seconds, "pool_batches": self.pool_batches,
                 "models": self.models.state_dict(), "ema": self.ema.params, "optimizer": self.optimizer.state_dict()}
        atomic_write(self.dir / "state.pt", lambda p: torch.save(state, p))
        weights = {k: half(k, v.detach().cpu()) for k, v in self.ema.state_dict(self.models).items()}
        meta = {"stage": self.name, "step": self.step, "seconds": self.seconds, "normalization": self.normalization,
                "configs": {k: stage_config(k, self.overrides) for k in self.models}}
        atomic_write(self.dir / "weights.safetensors",
                     lambda p: save_file(weights, str(p), metadata={"pixal3d": json.dumps(meta)}))

    def load(self) -> None:
        state = torch.load(self.dir / "state.pt", map_location=self.device, weights_only=True)
        self.models.load_state_dict(state["models"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.params = state["ema"]
        self.step, self.seconds, self.pool_batches = state["step"], state["seconds"], state["pool_batches"]

    def log(self, record: dict) -> None:
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"stage": self.name, **record}) + "\n")

    # -- training ---------------------------------------------------------------------------------------
    def build_pool(self, budget_seconds: float, max_batches: int) -> Views:
        t0 = time.monotonic()
        if self.pool_dir is not None:      # shared flow pool (flow_pool.py): already prepared for every flow
            if not self.pool_dir.is_dir():
                raise FileNotFoundError(f"no pool folder {self.pool_dir}; generate it with "
                                        "python -m pixal3d_backend.training.flow_pool")
            while not shard_files(self.pool_dir) and time.monotonic() - t0 < budget_seconds:
                time.sleep(1.0)            # a pool being written: its first part is on the way
            self.pool_files = set()
            pool = self.grow_pool(None)
            if pool is None:
                raise FileNotFoundError(f"no shard file appeared in {self.pool_dir} within the stage's budget")
            return pool
        generator = ViewGenerator(OBJECTS_PER_GENERATOR_BATCH, str(self.device), self.stage.needs_images)
        deadline = None if self.pool_batches else t0 + POOL_FRACTION[self.name] * budget_seconds
        pool, self.pool_batches = generate_pool(generator, self.pool_batches or max_batches, self.workers,
                                                lambda v: self.stage.prepare(v.to(self.device)), deadline)
        self.log({"event": "pool", "views": len(pool), "batches": self.pool_batches,
                  "seconds": round(time.monotonic() - t0, 1)})
        return pool

    def grow_pool(self, pool: Views | None) -> Views | None:
        """`pool` plus the shard files of the pool folder that it does not hold yet."""
        t0 = time.monotonic()
        new = [p for p in shard_files(self.pool_dir) if p.name not in self.pool_files]
        if not new:
            return pool
        parts = [Views.load(p, self.device) for p in new]
        self.pool_files.update(p.name for p in new)
        pool = Views.concat(([pool] if pool is not None else []) + parts)
        self.log({"event": "pool", "step": self.step, "views": len(pool), "added": sum(len(v) for v in parts),
                  "files": len(self.pool_files), "from": str(self.pool_dir), "seconds": round(time.monotonic() - t0, 1)})
        return pool

    @torch.no_grad()
    def validate(self) -> None:
        """Loss of the EMA weights on the validation views, with the same noise, timesteps and condition dropout at
        every call (a CPU generator seeded per minibatch)."""
        if self.val is None:
            return
        live = {k: v.clone() for k, v in self.models.state_dict().items()}
        self.models.load_state_dict(self.ema.state_dict(self.models))
        self.models.eval()
        totals, n = {}, VIEWS_PER_STEP[self.name]
        for start in range(0, len(self.val), n):
            batch = self.val.select(torch.arange(start, min(start + n, len(self.val))))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                terms = self.stage.losses(batch, torch.Generator().manual_seed(VAL_SEED + start), training=False)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(batch)
        self.models.load_state_dict(live)
        self.models.train()
        self.log({"event": "val", "step": self.step, "views": len(self.val),
                  **{k: v / len(self.val) for k, v in totals.items()}})

    def train_step(self, pool: Views) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        batch = pool.select(torch.randperm(len(pool), generator=gen)[:self.views_per_step])
        lr = LEARNING_RATE[self.name] * min(1.0, (self.step + 1) / WARMUP_STEPS)
        if self.lr_decay is not None:
            lr *= 1.0 - (1.0 - self.lr_decay) * min(1.0, self.lr_progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            terms = self.stage.losses(batch, gen)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.models.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.ema.update(self.models, self.step)
        self.step += 1
        return {**{k: v.item() for k, v in terms.items()}, "grad_norm": float(grad_norm), "lr": lr}

    def initialise_from(self, source: Path) -> None:
        """Starts from earlier weights (fine-tuning: a new optimiser, step 0): the same stage of an earlier run, or
        a model snapshot (e.g. the bundled default model) holding the stage's networks. A snapshot holds no VAE
        encoder: with `freeze_encoder` only the decoder comes from it; otherwise the encoder starts from this run's own
        (OUT/<stage>/weights.safetensors, an earlier phase's) and the whole VAE trains on."""
        encoder = trained_keys(self.name)[0]
        keys = [k for k in self.models if not (self.freeze_encoder and k == encoder)]
        if (source / "pipeline.json").is_file():
            loaded = load_model(source, device="cpu")
            networks = {**loaded.pipeline.models, **loaded.pipeline.encoders}
            own = self.dir / "weights.safetensors"
            if encoder in keys and encoder not in networks and own.is_file():
                tensors, _ = load_weights(own)
                load_network(self.models[encoder], tensors, encoder)
                keys.remove(encoder)
            missing = [k for k in keys if k not in networks]
            if missing:
                raise ValueError(f"{source} has no {missing} to initialise stage {self.name} from")
            states = {key: networks[key].state_dict() for key in keys}
        else:
            tensors, _ = load_weights(source / self.name / "weights.safetensors")
            states = {key: trainable_state(tensors, key) for key in keys}
        for key, state in states.items():
            if self.name.endswith("_flow"):           # a flow stage's networks: its flow and its image encoder
                new_blocks = deepen(self.models[key], state)
                if new_blocks:
                    self.log({"event": "deepen", "network": key, "new_blocks": new_blocks})
            else:
                self.models[key].load_state_dict(state)
        self.ema = EMA(self.models)

    def freeze_trained_encoder(self) -> None:
        """Fine-tunes the decoder alone on the latents of this stage's earlier encoder (OUT/<stage>/weights), so
        the flows trained on those latents stay valid; the latent normalisation is that encoder's."""
        key = trained_keys(self.name)[0]
        tensors, meta = load_weights(self.dir / "weights.safetensors")
        load_network(self.models[key], tensors, key)
        self.models[key].requires_grad_(False)
        self.normalization = meta.get("normalization", {})
        self.ema = EMA(self.models)

    def run(self, minutes: float, resume: bool, max_steps: int | None = None, max_pool_batches: int = 10_000,
            init: Path | None = None) -> None:
        """Trains for `minutes` of wall clock (pool generation included) or until step `max_steps`."""
        start = time.monotonic()
        self.lr_progress = lambda: (time.monotonic() - start) / (60 * minutes)
        resumed = resume and (self.dir / "state.pt").is_file()
        if resumed:
            self.load()
        elif init is not None:
            self.initialise_from(init)
        if self.freeze_encoder and not resumed:
            self.freeze_trained_encoder()
        elif self.freeze_encoder:
            self.models[trained_keys(self.name)[0]].requires_grad_(False)
        self.log({"event": "start", "step": self.step, "resumed": resumed, "torch": torch.__version__,
                  "frozen_encoder": self.freeze_encoder,
                  "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                  "views_per_step": self.views_per_step, "minutes": minutes, "lr_decay": self.lr_decay,
                  **({"augment": self.stage.augment, "structure_weight": self.stage.structure_weight}
                     if self.name == "ss_flow" else {}),
                  "init": str(init) if init is not None and not resumed else None})
        pool = self.build_pool(60 * minutes, max_pool_batches)
        self.validate()
        self.models.train()
        last_checkpoint = last_poll = time.monotonic()
        window = []
        while time.monotonic() - start < 60 * minutes and (max_steps is None or self.step < max_steps):
            if self.pool_dir is not None and time.monotonic() - last_poll > POOL_POLL_SECONDS:
                pool, last_poll = self.grow_pool(pool), time.monotonic()
            t = time.monotonic()
            window.append(self.train_step(pool))
            self.seconds += time.monotonic() - t
            if not math.isfinite(window[-1]["loss"]):
                raise FloatingPointError(f"{self.name}: loss is {window[-1]['loss']} at step {self.step}")
            if self.step % self.log_every == 0:
                self.log({"step": self.step, "seconds": round(self.seconds, 1),
                          **{k: sum(w[k] for w in window) / len(window) for k in window[0]}})
                window = []
            if time.monotonic() - last_checkpoint > self.checkpoint_seconds:
                self.save()
                self.validate()
                last_checkpoint = time.monotonic()
        self.finish(pool)

    def finish(self, pool: Views) -> None:
        """Latent normalisation of the shape/texture VAEs (EMA encoder over the pool), then the final checkpoint."""
        if self.name in ("shape_vae", "tex_vae") and not self.freeze_encoder:
            key = trained_keys(self.name)[0]
            encoder = build(key, self.overrides).to(self.device).eval()
            encoder.load_state_dict(prefixed(self.ema.state_dict(self.models), key))
            inputs = shape_inputs if self.name == "shape_vae" else texture_inputs
            self.normalization = {self.name.split("_")[0]: latent_statistics(encoder, pool, inputs)}
        self.save()
        self.log({"event": "checkpoint", "step": self.step, "seconds": round(self.seconds, 1)})
        self.validate()


def stage_minutes(stages: list[str], minutes: float) -> dict[str, float]:
    total = sum(configs.PLAN_MINUTES[s] for s in stages)
    return {s: minutes * configs.PLAN_MINUTES[s] / total for s in stages}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", nargs="+", required=True, choices=(*configs.STAGES, "all"))
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of this invocation")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue each stage from DIR/<stage>/state.pt")
    p.add_argument("--init", type=Path, help="start each stage from RUN/<stage>/weights.safetensors of an earlier "
                   "run, or from a model snapshot folder (fine-tuning; ignored for a stage that resumes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0,
                   help="data-generation processes sharing the device (0: in this process; several processes on "
                        "one GPU gave no measured speed-up)")
    p.add_argument("--pool", type=Path, help="train flow stages on the shards of this folder (flow_pool.py) "
                   "instead of generating a pool; shard files that appear while training join the pool")
    p.add_argument("--val-pool", type=Path, help="a flow_pool.py folder of views never trained on: log the EMA "
                   "weights' loss on it at the start, at every checkpoint and at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--freeze-encoder", action="store_true",
                   help="VAE stages: train the decoder alone on the latents of the encoder in OUT/<stage>/weights "
                        "(keeps the flows trained on those latents valid)")
    p.add_argument("--lr-decay", type=float, default=None, metavar="F",
                   help="lower the learning rate linearly over this invocation's minutes, to F times its rate")
    p.add_argument("--blocks", type=int, default=None, metavar="N",
                   help="flow stages: a transformer of N blocks; from an --init with fewer, the new blocks start as "
                        "the identity (pass it again with --resume)")
    p.add_argument("--encoder-layers", type=int, default=None, metavar="N",
                   help="flow stages: an image encoder of N DINOv3 layers, deepened like --blocks")
    p.add_argument("--views-per-step", type=int, default=None, metavar="N",
                   help="minibatch size (default: the stage's, stages.VIEWS_PER_STEP)")
    p.add_argument("--pe-mode", choices=("rope", "ape"), default=None,
                   help="ss_flow: how the flow sees grid positions (default: the config's); from an --init with the "
                        "other mode every parameter carries over (pass it again with --resume)")
    p.add_argument("--augment", action="store_true", help="ss_flow: train on mirrored and recoloured views "
                   "(stages.mirror_and_recolour; needs a pool that carries the occupancy)")
    p.add_argument("--structure-loss", type=float, default=0.0, metavar="W",
                   help="ss_flow: add W times the occupancy loss of the structure decoded from the implied clean "
                        "latent (losses.structure_loss; needs the SS decoder in OUT/ss_vae)")
    return p


def trainer(stage: str, args: argparse.Namespace) -> Trainer:
    """The trainer of one stage as the command line asks for it."""
    return Trainer(stage, args.out, args.device, args.seed, args.workers, checkpoint_minutes=args.checkpoint_minutes,
                   pool_dir=args.pool, freeze_encoder=args.freeze_encoder, val_dir=args.val_pool, blocks=args.blocks,
                   lr_decay=args.lr_decay, encoder_layers=args.encoder_layers, views_per_step=args.views_per_step,
                   augment=args.augment, structure_weight=args.structure_loss, pe_mode=args.pe_mode)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    # Every flow batch packs a new mix of token counts: cuDNN attention would build an execution plan for each new
    # shape (the first minutes of a run were ~25x slower per step than its end); flash attention builds none.
    os.environ.setdefault("PIXAL3D_SDPA", "flash,efficient,math")
    stages = list(configs.STAGES) if "all" in args.stage else args.stage
    for stage, minutes in stage_minutes(stages, args.minutes).items():
        if (args.pool is not None or args.val_pool is not None) and not stage.endswith("_flow"):
            p.error(f"--pool and --val-pool hold flow training data; stage {stage} generates its own")
        trainer(stage, args).run(minutes, args.resume, args.max_steps, init=args.init)


if __name__ == "__main__":
    main()

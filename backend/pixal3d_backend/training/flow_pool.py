"""Flow training data, generated once on several GPUs and shared by the three flow stages.

    python -m pixal3d_backend.training.flow_pool --vae RUN --out POOL --shard 0 --shards 4 --minutes 4
    python -m pixal3d_backend.training.train --stage shape_flow --pool POOL ...

Generating a view (a 512 px render and flexible-dual-grid targets at 256^3) is ~50x slower than a flow training
step and latency-bound, so one process per GPU generates while the flows wait; the three flows need the same
views. Shard `k` of `n` generates `batches.ViewGenerator` batches k, k + n, k + 2n, ... until its minutes are
up and writes `POOL/shard_<k>.pt`: the images, cameras and every flow's latents (`stages.flow_targets` with the
frozen VAE encoders of RUN), so a flow stage only loads the shards.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .batches import ViewGenerator, Views
from .stages import flow_targets
from .train import OBJECTS_PER_GENERATOR_BATCH, dependencies


def generate_shard(vae_run: Path, shard: int, shards: int, minutes: float, device: str,
                   max_batches: int | None = None, first_batch: int = 0) -> tuple[Views, int]:
    """Views of generator batches first + shard, first + shard + shards, ... for `minutes` (at least one batch)."""
    frozen, normalization = {}, {}
    for flow in ("ss_flow", "tex_flow"):                  # between them they depend on all three VAEs
        nets, norm = dependencies(vae_run, flow, device)
        frozen.update(nets)
        normalization.update(norm)
    generator = ViewGenerator(OBJECTS_PER_GENERATOR_BATCH, device, with_images=True)
    deadline, parts, index = time.monotonic() + 60 * minutes, [], first_batch + shard
    while not parts or (time.monotonic() < deadline and (max_batches is None or len(parts) < max_batches)):
        parts.append(flow_targets(generator[index].to(device), frozen, normalization).to("cpu"))
        index += shards
    return Views.concat(parts), len(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", type=Path, required=True, help="run folder holding ss_vae/, shape_vae/, tex_vae/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--first-batch", type=int, default=0, help="generator batch to start from: a later run gives "
                   "new views by starting past the batches earlier pools used")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if not 0 <= a.shard < a.shards:
        p.error(f"--shard must be in [0, {a.shards})")
    t0 = time.monotonic()
    views, batches = generate_shard(a.vae, a.shard, a.shards, a.minutes, a.device, a.max_batches, a.first_batch)
    a.out.mkdir(parents=True, exist_ok=True)
    views.save(a.out / f"shard_{a.shard}.pt")
    print(json.dumps({"shard": a.shard, "first_batch": a.first_batch, "views": len(views), "batches": batches,
                      "seconds": round(time.monotonic() - t0, 1)}))


if __name__ == "__main__":
    main()

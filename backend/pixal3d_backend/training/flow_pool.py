"""Flow training data, generated once on several GPUs and shared by the three flow stages.

    python -m pixal3d_backend.training.flow_pool --vae RUN --out POOL --shard 0 --shards 4 --minutes 4
    python -m pixal3d_backend.training.train --stage shape_flow --pool POOL ...

Generating a view (a 512 px render and flexible-dual-grid targets at 256^3) is ~50x slower than a flow training
step and latency-bound, so one process per GPU generates while the flows wait; the three flows need the same
views. Shard `k` of `n` generates `batches.ViewGenerator` batches k, k + n, k + 2n, ... until its minutes are
up and writes `POOL/shard_<k>.pt`: the images, cameras and every flow's latents (`stages.flow_targets` with the
frozen VAE encoders of RUN), so a flow stage only loads the shards. With `--save-every M` it writes what it has
every M minutes as `POOL/shard_<k>_<part>.pt` instead, and flows training from POOL at the same time take the new
parts in as they appear (`train.py --pool`): generation and training share one device command.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .batches import ViewGenerator, Views
from .stages import flow_targets
from .train import OBJECTS_PER_GENERATOR_BATCH, atomic_write, dependencies


def shard_batches(vae_run: Path, shard: int, shards: int, device: str, first_batch: int = 0) -> Iterator[Views]:
    """The prepared views of generator batches first + shard, first + shard + shards, ..., one batch at a time."""
    frozen, normalization = {}, {}
    for flow in ("ss_flow", "tex_flow"):                  # between them they depend on all three VAEs
        nets, norm = dependencies(vae_run, flow, device)
        frozen.update(nets)
        normalization.update(norm)
    generator = ViewGenerator(OBJECTS_PER_GENERATOR_BATCH, device, with_images=True)
    for index in itertools.count(first_batch + shard, shards):
        yield flow_targets(generator[index].to(device), frozen, normalization).to("cpu")


def write_shard(vae_run: Path, out: Path, shard: int, shards: int, minutes: float, device: str,
                max_batches: int | None = None, first_batch: int = 0, save_every: float | None = None) -> dict:
    """Generates for `minutes` (at least one batch, at most `max_batches`) into `out`: one `shard_<k>.pt` at the
    end, or with `save_every` (minutes) a `shard_<k>_<part>.pt` of the batches made since the last one."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline, last_save = t0 + 60 * minutes, t0
    parts, batches, views, files = [], 0, 0, 0
    for part in shard_batches(vae_run, shard, shards, device, first_batch):
        parts.append(part)
        batches += 1
        now = time.monotonic()
        done = now >= deadline or (max_batches is not None and batches >= max_batches)
        if done or (save_every is not None and now - last_save >= 60 * save_every):
            name = f"shard_{shard}.pt" if save_every is None else f"shard_{shard}_{files}.pt"
            chunk = Views.concat(parts)
            atomic_write(out / name, chunk.save)
            views, files, parts, last_save = views + len(chunk), files + 1, [], now
        if done:
            break
    return {"shard": shard, "first_batch": first_batch, "views": views, "batches": batches, "files": files,
            "seconds": round(time.monotonic() - t0, 1)}


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
    p.add_argument("--save-every", type=float, default=None,
                   help="minutes between partial shard files, for flows that train while the pool grows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if not 0 <= a.shard < a.shards:
        p.error(f"--shard must be in [0, {a.shards})")
    print(json.dumps(write_shard(a.vae, a.out, a.shard, a.shards, a.minutes, a.device, a.max_batches, a.first_batch,
                                 a.save_every)))


if __name__ == "__main__":
    main()

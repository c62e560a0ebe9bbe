"""Training examples from the procedural data engine: generated on the training device, pooled, re-sampled.

One example is one *view* of a procedural object, because the object is posed in that view's camera frame
(spec §2.3; official: 2 views per asset). Views are `data.views.crop_view`s: the camera relation inference
builds from the object's crop, so the model learns the relation it is used with. Batch `k` of the generator holds the train objects
`k * objects .. (k + 1) * objects - 1` in all their views, so everything is a pure function of indices.

Generating a view costs ~0.1 s of flexible-dual-grid targets at 256^3 plus ~0.2 s of rendering on an H200 (it is
latency-bound, not throughput-bound), far slower than a training step of the small model. Each stage therefore
first fills a pool (optionally in worker processes), then trains on random minibatches of it; the pool is
regenerated identically on resume.

The sparse structure is derived from the flexible-dual-grid voxels (the 64^3 cells that contain them), so the
32^3 cells it max-pools to are exactly the tokens the shape and texture latents live on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data import ProceduralDataset, PosedObject, render_views, shape_targets, surface_samples
from ..data.views import crop_view
from ..sparse import SparseTensor
from . import configs
from .voxels import coarsen


@dataclass
class Views:
    """A set of views: `dense` tensors have one row per view; `sparse` tensors have one row per voxel of
    `coords` [N, 4] = (view, x, y, z) (sorted, so each view's voxels are contiguous)."""
    dense: dict[str, torch.Tensor]
    coords: torch.Tensor
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.dense.values())).shape[0]

    def to(self, device) -> "Views":
        move = lambda d: {k: v.to(device) for k, v in d.items()}
        return Views(move(self.dense), self.coords.to(device), move(self.sparse))

    def select(self, views: torch.Tensor) -> "Views":
        """The given views, renumbered 0..len(views)-1 in that order."""
        views = views.to(self.coords.device)
        counts = torch.bincount(self.coords[:, 0].long(), minlength=len(self))
        starts = torch.cumsum(counts, 0) - counts
        rows = torch.cat([torch.arange(int(starts[v]), int(starts[v] + counts[v]), device=views.device)
                          for v in views.tolist()])
        coords = self.coords[rows].clone()
        coords[:, 0] = torch.repeat_interleave(torch.arange(len(views), device=views.device, dtype=torch.int32),
                                               counts[views])
        return Views({k: v[views] for k, v in self.dense.items()}, coords,
                     {k: v[rows] for k, v in self.sparse.items()})

    @staticmethod
    def concat(parts: list["Views"]) -> "Views":
        offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in parts[:-1]]), 0).tolist()
        coords = torch.cat([p.coords + torch.tensor([o, 0, 0, 0], dtype=torch.int32, device=p.coords.device)
                            for p, o in zip(parts, offsets)])
        return Views({k: torch.cat([p.dense[k] for p in parts]) for k in parts[0].dense}, coords,
                     {k: torch.cat([p.sparse[k] for p in parts]) for k in parts[0].sparse})

    def sparse_tensor(self, name: str) -> SparseTensor:
        return SparseTensor(self.sparse[name], self.coords)

    def save(self, path) -> None:
        """To a file, images as 8-bit (what inference reads from PNGs anyway; a quarter of the bytes)."""
        dense = dict(self.dense)
        if "images" in dense:
            dense["images"] = (dense["images"] * 255).round().to(torch.uint8)
        torch.save({"dense": dense, "coords": self.coords, "sparse": self.sparse}, path)

    @staticmethod
    def load_shards(folder: Path, device="cpu") -> "Views":
        """Every shard file of a folder (`flow_pool.py` writes them), in shard order."""
        files = shard_files(folder)
        if not files:
            raise FileNotFoundError(f"no shard_*.pt in {folder}; generate them with "
                                    "python -m pixal3d_backend.training.flow_pool")
        return Views.concat([Views.load(p, device) for p in files])

    @staticmethod
    def load(path, device="cpu") -> "Views":
        state = torch.load(path, map_location=device, weights_only=True)
        dense = state["dense"]
        if "images" in dense:
            dense["images"] = dense["images"].float() / 255
        return Views(dense, state["coords"], state["sparse"])


def shard_files(folder: Path) -> list[Path]:
    """`shard_<k>.pt` and `shard_<k>_<part>.pt` files (flow_pool.py; parts when it saves as it goes), ordered by
    shard number, then part; a file still being written has another suffix until it is complete."""
    def order(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in path.stem.split("_")[1:])
    return sorted(folder.glob("shard_*.pt"), key=order)


# -- the flexible-dual-grid views and what the encoders read from them --------------------------------------

def shape_inputs(v: Views) -> SparseTensor:
    """Shape-encoder input per voxel: offset - 0.5, edge flag - 0.5, log(split) / 6 (all about in [-1, 1])."""
    s = v.sparse
    return SparseTensor(torch.cat([s["offsets"] - 0.5, s["intersected"].float() - 0.5,
                                   s["split"].log()[:, None] / 6], 1), v.coords)


def texture_inputs(v: Views) -> SparseTensor:
    """Texture-encoder input: the PBR attributes mapped to [-1, 1] (inverse of the decoder's x 0.5 + 0.5)."""
    return SparseTensor(v.sparse["attributes"] * 2 - 1, v.coords)


def occupancy(v: Views) -> torch.Tensor:
    """[B, 1, R, R, R] float sparse-structure occupancy at SS_RESOLUTION."""
    r = configs.SS_RESOLUTION
    cells = coarsen(v.coords, configs.SHAPE_RESOLUTION // r).long()
    grid = torch.zeros(len(v), 1, r, r, r, device=v.coords.device)
    grid[cells[:, 0], 0, cells[:, 1], cells[:, 2], cells[:, 3]] = 1.0
    return grid


class ViewGenerator(torch.utils.data.Dataset):
    """`generator[k]` -> the `Views` (on the CPU) of train objects `k * objects ...`, computed on `device`.
    With images: `dense` = {images [V, 3, S, S] premultiplied on black, cameras [V, 3] (fov, distance,
    mesh_scale)}; always `sparse` = {offsets, intersected, split, attributes} on the voxels at SHAPE_RESOLUTION."""

    def __init__(self, objects: int, device: str, with_images: bool, views_per_object: int = 2,
                 supersample: int = 2):
        self.objects, self.with_images, self.supersample = objects, with_images, supersample
        self.dataset = ProceduralDataset("train", image_size=configs.IMAGE_SIZE, ss_resolution=configs.SS_RESOLUTION,
                                         shape_resolution=configs.SHAPE_RESOLUTION,
                                         views_per_object=views_per_object, device=device)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> Views:
        ds, parts = self.dataset, []
        for i in range(index * self.objects, (index + 1) * self.objects):
            obj = ds.object(i)
            fld = obj.field(ds.device)
            surface = surface_samples(fld, 32).cpu().double().numpy()
            views = [crop_view(v, surface) for v in ds.views(obj, surface)]
            targets = [shape_targets(PosedObject(fld, v), ds.shape_resolution) for v in views]
            dense = {"cameras": torch.tensor([[v.fov, v.distance, v.mesh_scale] for v in views])}
            if self.with_images:
                dense["images"] = render_views(fld, views, ds.image_size, self.supersample).conditioning.cpu()
            coords = torch.cat([torch.cat([torch.full((len(t.coords), 1), b, dtype=torch.int32), t.coords.cpu()], 1)
                                for b, t in enumerate(targets)])
            cat = lambda name: torch.cat([getattr(t, name).cpu() for t in targets])
            parts.append(Views(dense, coords, {"offsets": cat("offsets"), "intersected": cat("intersected"),
                                               "split": cat("split_weight"), "attributes": cat("attributes")}))
        return Views.concat(parts)


def generate_pool(generator: ViewGenerator, batches: int, workers: int, transform: Callable[[Views], Views],
                  deadline: float | None = None) -> tuple[Views, int]:
    """`transform` of the generator's batches 0, 1, ... concatenated: `batches` of them, or fewer if
    `time.monotonic()` passes `deadline` (at least one). Returns (pool, number of batches used). Workers are
    spawned processes (each with its own CUDA context), so the latency-bound generation of several objects
    overlaps; batches arrive in order, so a pool is reproduced exactly from its batch count."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(generator, range(batches)), batch_size=None, num_workers=workers,
        multiprocessing_context="spawn" if workers else None)
    parts = []
    for views in loader:
        parts.append(transform(views))
        if deadline is not None and time.monotonic() > deadline:
            break
    return Views.concat(parts), len(parts)

"""The deterministic procedural dataset and its throughput benchmark.

Item `i` of a split is the object of seed `split_base + i` seen from `views_per_object` views (the official
data renders 2 views per asset, spec §4.6). Train seeds are `[0, EVAL_SEED_BASE)`, eval seeds start at
`EVAL_SEED_BASE`, so the held-out set can never be trained on. Every random choice (object, materials,
views, lights) comes from NumPy generators seeded by the object seed, so a sample is the same on every
machine up to floating-point differences between devices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .grammar import make_object, surface_samples
from .render import Renders, render_views
from .shapes import ProceduralObject
from .targets import PosedObject, ShapeTargets, occupancy, shape_targets
from .views import View, random_view

EVAL_SEED_BASE = 1 << 40          # eval seeds: EVAL_SEED_BASE + i; train seeds: i < EVAL_SEED_BASE
_VIEW_STREAM = 0x5EED_71E5        # separates the view generator's stream from the object's


@dataclass
class Sample:
    seed: int
    category: str
    renders: Renders                 # one entry per view
    occupancy: torch.Tensor          # [V, R_ss, R_ss, R_ss] bool, one grid per view (the model frame is per view)
    shapes: list[ShapeTargets]       # one per view


def seed_of(split: str, index: int) -> int:
    if index < 0 or index >= EVAL_SEED_BASE:
        raise IndexError(f"index {index} outside [0, {EVAL_SEED_BASE})")
    if split == "train":
        return index
    if split == "eval":
        return EVAL_SEED_BASE + index
    raise ValueError(f"unknown split {split!r}")


class ProceduralDataset(torch.utils.data.Dataset):
    """`dataset[i]` -> `Sample`. `shape_resolution` is the FDG grid (16x the shape latent grid),
    `ss_resolution` the sparse-structure occupancy grid; `image_size` the conditioning image side."""

    def __init__(self, split: str = "train", length: int = 100_000, image_size: int = 256,
                 ss_resolution: int = 32, shape_resolution: int = 128, views_per_object: int = 2,
                 supersample: int = 2, device: torch.device | str = "cpu"):
        seed_of(split, length - 1)                           # validates the split and that seeds stay disjoint
        self.split, self.length = split, length
        self.image_size, self.supersample = image_size, supersample
        self.ss_resolution, self.shape_resolution = ss_resolution, shape_resolution
        self.views_per_object = views_per_object
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.length

    def object(self, index: int) -> ProceduralObject:
        return make_object(seed_of(self.split, index), device=self.device)

    def views(self, obj: ProceduralObject, surface: np.ndarray) -> list[View]:
        rng = np.random.default_rng([obj.seed, _VIEW_STREAM])
        return [random_view(surface, rng) for _ in range(self.views_per_object)]

    def __getitem__(self, index: int) -> Sample:
        obj = self.object(index)
        field = obj.field(self.device)
        surface = surface_samples(field, 32).cpu().double().numpy()
        views = self.views(obj, surface)
        renders = render_views(field, views, self.image_size, self.supersample)
        posed = [PosedObject(field, v) for v in views]
        return Sample(seed=obj.seed, category=obj.category, renders=renders,
                      occupancy=torch.stack([occupancy(p, self.ss_resolution) for p in posed]),
                      shapes=[shape_targets(p, self.shape_resolution) for p in posed])


def benchmark(device: torch.device | str = "cpu", objects: int = 4, image_size: int = 256,
              shape_resolution: int = 128, ss_resolution: int = 32, supersample: int = 2) -> dict[str, float]:
    """Throughput of each stage on `device`: objects/s (grammar + normalisation), renders/s (views/s) and
    target sets/s (occupancy + FDG + attributes per view), plus full samples/s."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ds = ProceduralDataset("train", image_size=image_size, ss_resolution=ss_resolution,
                           shape_resolution=shape_resolution, supersample=supersample, device=device)
    ds[0]                                                     # warm-up (allocator, kernels)
    timings = {"objects": 0.0, "renders": 0.0, "targets": 0.0}
    for i in range(1, objects + 1):
        sync(); t0 = time.perf_counter()
        obj = ds.object(i)
        field = obj.field(device)
        views = ds.views(obj, surface_samples(field, 32).cpu().double().numpy())
        sync(); t1 = time.perf_counter()
        render_views(field, views, image_size, supersample)
        sync(); t2 = time.perf_counter()
        for v in views:
            posed = PosedObject(field, v)
            occupancy(posed, ss_resolution)
            shape_targets(posed, shape_resolution)
        sync(); t3 = time.perf_counter()
        timings["objects"] += t1 - t0
        timings["renders"] += t2 - t1
        timings["targets"] += t3 - t2
    n_views = objects * ds.views_per_object
    return {"objects_per_s": objects / timings["objects"], "renders_per_s": n_views / timings["renders"],
            "targets_per_s": n_views / timings["targets"], "samples_per_s": objects / sum(timings.values())}

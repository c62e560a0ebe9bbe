"""Procedural 3-D data engine for training the default model: SDF objects from a seeded grammar, procedural
PBR materials, a sphere-tracing PBR renderer in the official training camera relation, and targets in the
official representations (sparse-structure occupancy, flexible dual grid, PBR voxel attributes)."""
from .dataset import EVAL_SEED_BASE, ProceduralDataset, Sample, benchmark, seed_of
from .grammar import CATEGORIES, make_object, surface_samples
from .materials import Material, random_material
from .render import Renders, render_views
from .shapes import ObjectField, Part, ProceduralObject
from .targets import PosedObject, ShapeTargets, occupancy, reconstruct_mesh_from_targets, shape_targets
from .views import Lighting, View, random_view

__all__ = [
    "CATEGORIES", "EVAL_SEED_BASE", "Lighting", "Material", "ObjectField", "Part", "PosedObject",
    "ProceduralDataset", "ProceduralObject", "Renders", "Sample", "ShapeTargets", "View", "benchmark",
    "make_object", "occupancy", "random_material", "random_view", "reconstruct_mesh_from_targets",
    "render_views", "seed_of", "shape_targets", "surface_samples",
]

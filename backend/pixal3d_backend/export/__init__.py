"""Export stage: remesh, decimate, UV unwrap, bake PBR maps, GLB (spec §6.2, frame §7)."""
from .asset import ExportedAsset, ExportOptions, export_asset
from .glb import GlbCamera, to_trimesh, write_glb

__all__ = ["ExportOptions", "ExportedAsset", "GlbCamera", "export_asset", "to_trimesh", "write_glb"]

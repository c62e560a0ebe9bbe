"""Writing an `ExportedAsset` as a GLB with trimesh: one mesh, one glTF PBR metallic-roughness material.

Material: `baseColorTexture` RGBA, `metallicRoughnessTexture` (G roughness, B metallic), `normalTexture` when
baked, factors 1, `alphaMode` BLEND/MASK only when alpha is used, `doubleSided` false for closed (remeshed)
surfaces. PNG textures are lossless, so the file holds exactly the asset's pixels; WebP (`EXT_texture_webp`)
is written by trimesh with Pillow's default lossy quality.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

import numpy as np
import trimesh
from PIL import Image

from .asset import ExportedAsset


@dataclass(frozen=True)
class GlbCamera:
    """The source camera as a glTF camera node: `glb_to_camera` maps GLB points to camera-local points (OpenGL
    axes, looking along -Z, what glTF cameras use), e.g. `CropCamera.glb_to_camera()`; `yfov` in radians.
    glTF cameras have no lens shift, so the transform must be rigid: for an off-axis crop pass the centred crop
    camera (`dataclasses.replace(crop, shear_x=0.0, shear_y=0.0)`), which reproduces the model's input view."""
    glb_to_camera: np.ndarray
    yfov: float
    aspect_ratio: float = 1.0

    def camera_to_glb(self) -> np.ndarray:
        m = np.asarray(self.glb_to_camera, dtype=np.float64)
        r = m[:3, :3]
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-6) or np.linalg.det(r) < 0:
            raise ValueError("glb_to_camera must be a rigid transform (no shear or scale)")
        return np.linalg.inv(m)


def to_trimesh(asset: ExportedAsset) -> trimesh.Trimesh:
    """The asset as a trimesh mesh with a PBR material (vertex order and count kept)."""
    material = trimesh.visual.material.PBRMaterial(
        name="pixal3d",
        baseColorTexture=Image.fromarray(asset.base_color, "RGBA"),
        metallicRoughnessTexture=Image.fromarray(asset.metallic_roughness, "RGB"),
        normalTexture=Image.fromarray(asset.normal_map, "RGB") if asset.normal_map is not None else None,
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=1.0,
        roughnessFactor=1.0,
        alphaMode=asset.alpha_mode,
        alphaCutoff=asset.alpha_cutoff if asset.alpha_mode == "MASK" else None,
        doubleSided=asset.double_sided,
    )
    # trimesh keeps UVs with v up and flips them when writing glTF; hand it the flipped glTF UVs, in float64 so
    # that both flips are exact and the file holds the asset's float32 UVs bit for bit.
    uv = asset.uvs.astype(np.float64)
    uv[:, 1] = 1.0 - uv[:, 1]
    mesh = trimesh.Trimesh(vertices=asset.positions, faces=asset.faces, vertex_normals=asset.normals,
                           visual=trimesh.visual.TextureVisuals(uv=uv, material=material), process=False)
    return mesh


def write_glb(asset: ExportedAsset, path: str | pathlib.Path, camera: GlbCamera | None = None) -> None:
    """Writes the asset (and optionally the source camera as a camera node) to a .glb file."""
    scene = trimesh.Scene()
    scene.add_geometry(to_trimesh(asset), geom_name="pixal3d", node_name="pixal3d")
    if camera is not None:
        deg = math.degrees(camera.yfov)
        xfov = math.degrees(2 * math.atan(math.tan(camera.yfov / 2) * camera.aspect_ratio))
        scene.camera = trimesh.scene.Camera(name="source_camera", fov=(xfov, deg), z_near=0.01)
        scene.camera_transform = camera.camera_to_glb()
    data = scene.export(file_type="glb", include_normals=True, extension_webp=asset.image_format == "webp")
    pathlib.Path(path).write_bytes(data)

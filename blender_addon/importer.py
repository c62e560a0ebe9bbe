"""Builds the generated object in Blender from a finished job: mesh from prepared arrays, PBR images from PNG
bytes (packed into the .blend), a Principled BSDF material, placement in the source camera, provenance."""
from __future__ import annotations

import json

import bpy
import numpy as np
from mathutils import Matrix

from . import worker

ALPHA_OPAQUE = 254          # 8-bit alpha at or above this counts as opaque


def build_mesh(name: str, arrays) -> bpy.types.Mesh:
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(arrays.n_vertices)
    mesh.vertices.foreach_set("co", arrays.co)
    mesh.loops.add(arrays.vertex_index.size)
    mesh.loops.foreach_set("vertex_index", arrays.vertex_index)
    mesh.polygons.add(arrays.n_faces)
    mesh.polygons.foreach_set("loop_start", arrays.loop_start)
    if arrays.uv is not None:
        mesh.uv_layers.new(name="UVMap").data.foreach_set("uv", arrays.uv)
    mesh.validate(clean_customdata=False)
    mesh.update()
    if arrays.normals is not None:
        mesh.shade_smooth()
        mesh.normals_split_custom_set_from_vertices(arrays.normals)
    return mesh


def image_from_png(name: str, png: bytes, non_color: bool) -> bpy.types.Image:
    """An image datablock holding `png` packed (no file on disk), decoded by Blender."""
    image = bpy.data.images.new(name, 1, 1, alpha=True)
    image.pack(data=png, data_len=len(png))
    image.source = 'FILE'
    image.filepath_raw = f"//{bpy.path.clean_name(name)}.png"
    if non_color:
        image.colorspace_settings.is_data = True
    image.alpha_mode = 'CHANNEL_PACKED' if non_color else 'STRAIGHT'
    return image


def has_transparency(image: bpy.types.Image) -> bool:
    width, height = image.size
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    return bool((pixels[3::4] < ALPHA_OPAQUE / 255.0).any())


def build_material(name: str, maps: dict[str, bytes]) -> bpy.types.Material:
    """Principled BSDF: base colour (sRGB) -> Base Color, its alpha -> Alpha only where some texel is not
    opaque; metallicRoughness (Non-Color, G = roughness, B = metallic) split into Roughness and Metallic; an
    optional tangent-space normal map (Non-Color) through a Normal Map node."""
    material = bpy.data.materials.new(name)
    material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == 'BSDF_PRINCIPLED')
    bsdf.location = (300, 300)

    base = nodes.new("ShaderNodeTexImage")
    base.label = "Base Color"
    base.image = image_from_png(f"{name} base color", maps["base_color"], non_color=False)
    base.location = (-300, 500)
    links.new(base.outputs["Color"], bsdf.inputs["Base Color"])
    if has_transparency(base.image):
        links.new(base.outputs["Alpha"], bsdf.inputs["Alpha"])
        material.blend_method = 'BLEND'        # EEVEE Legacy (4.1) and the viewport
        if hasattr(material, "surface_render_method"):
            material.surface_render_method = 'BLENDED'   # EEVEE Next (4.2+)

    mr = nodes.new("ShaderNodeTexImage")
    mr.label = "Metallic Roughness"
    mr.image = image_from_png(f"{name} metallic roughness", maps["metallic_roughness"], non_color=True)
    mr.location = (-600, 150)
    split = nodes.new("ShaderNodeSeparateColor")
    split.location = (-250, 150)
    links.new(mr.outputs["Color"], split.inputs["Color"])
    links.new(split.outputs["Green"], bsdf.inputs["Roughness"])
    links.new(split.outputs["Blue"], bsdf.inputs["Metallic"])

    if "normal" in maps:
        normal = nodes.new("ShaderNodeTexImage")
        normal.label = "Normal"
        normal.image = image_from_png(f"{name} normal", maps["normal"], non_color=True)
        normal.location = (-600, -200)
        normal_map = nodes.new("ShaderNodeNormalMap")
        normal_map.location = (-250, -200)
        links.new(normal.outputs["Color"], normal_map.inputs["Color"])
        links.new(normal_map.outputs["Normal"], bsdf.inputs["Normal"])
    return material


def import_result(finished: worker.Finished, name: str, collection, camera_world: np.ndarray,
                  provenance: dict, parent=None) -> bpy.types.Object:
    """The object for `finished`, linked into `collection` and placed in the camera whose world matrix (without
    scale) was `camera_world` when the input was captured; optionally parented to `parent` (that camera)."""
    mesh = build_mesh(name, finished.mesh)
    mesh.materials.append(build_material(name, finished.result.maps))
    obj = bpy.data.objects.new(name, mesh)
    collection.objects.link(obj)
    world = Matrix(finished.placement.object_matrix_world(camera_world).tolist())
    if parent is not None:
        obj.parent = parent
        obj.matrix_parent_inverse = parent.matrix_world.inverted()
    obj.matrix_world = world
    obj["pixal3d"] = {key: _id_property(value) for key, value in provenance.items()}
    return obj


def _id_property(value):
    """ID properties hold ints, floats, strings and (nested) lists and dicts of them; None and anything else is
    stored as JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _id_property(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, str, dict)) for v in value):
        return [_id_property(v) for v in value]
    return json.dumps(value, default=str)

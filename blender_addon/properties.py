"""The panel's settings (per scene, saved with the .blend) and the job's display state (per window manager,
never saved). Generation options are built from `protocol.Options`, the one place their defaults and ranges
are defined."""
import dataclasses
import json

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .shared import protocol
from .worker import MODEL_DEFAULT_RESOLUTION

SOURCES = [
    ("CAMERA", "Active Camera", "Render the active camera's view with a transparent background; the alpha is the "
                                "object mask and the result is placed in that camera's view", 'CAMERA_DATA', 0),
    ("CAMERAS", "Cameras", "Multi-view: render every selected camera, or every camera of a collection; the active "
                           "(or scene) camera is the main view and the result is placed in its view",
     'OUTLINER_OB_CAMERA', 1),
    ("IMAGE", "Image", "A Blender image; its alpha (if any) is the object mask", 'IMAGE_DATA', 2),
    ("FILE", "Image File", "An image file on disk; its alpha (if any) is the object mask", 'FILE_IMAGE', 3),
]

_LABELS = {
    "seed": "Seed", "resolution": "Resolution", "ss_steps": "Structure Steps", "ss_guidance": "Structure Guidance",
    "shape_steps": "Shape Steps", "shape_guidance": "Shape Guidance", "tex_steps": "Texture Steps",
    "tex_guidance": "Texture Guidance", "face_target": "Face Target", "texture_size": "Texture Size",
    "remesh": "Remesh", "normal_map": "Normal Map", "low_vram": "Low VRAM",
    "visibility_weighted": "Visible Views Only", "unwrap": "UV Unwrap",
}
_CHOICE_LABELS = {"charts": "Charts", "xatlas": "xatlas"}
RESOLUTIONS = (MODEL_DEFAULT_RESOLUTION, 256, 1024, 1536)


def _choice_label(value) -> str:
    if isinstance(value, str):
        return _CHOICE_LABELS[value]
    return f"{value} px" if value else "Model Default"


def _option_property(option: dataclasses.Field):
    spec, default = option.metadata, option.default
    common = {"name": _LABELS[option.name], "description": spec["doc"].capitalize()}
    if spec["choices"] or option.name == "resolution":
        values = spec["choices"] or RESOLUTIONS
        if option.name == "resolution":
            default = MODEL_DEFAULT_RESOLUTION
        return EnumProperty(items=[(str(v), _choice_label(v), "") for v in values], default=str(default), **common)
    if isinstance(default, bool):
        return BoolProperty(default=default, **common)
    if isinstance(default, int):
        # IntProperty is a signed 32-bit int: the seed's range is clamped to it.
        return IntProperty(default=default, min=int(spec["low"]), max=min(int(spec["high"]), 2**31 - 1), **common)
    return FloatProperty(default=default, min=spec["low"], max=spec["high"], **common)


class PIXAL3D_PG_settings(bpy.types.PropertyGroup):
    __annotations__ = {f.name: _option_property(f) for f in dataclasses.fields(protocol.Options)}

    source: EnumProperty(name="Source", items=SOURCES, default="CAMERA")
    image: PointerProperty(name="Image", type=bpy.types.Image)
    filepath: StringProperty(name="Image File", subtype='FILE_PATH')
    camera_collection: PointerProperty(
        name="Camera Collection", type=bpy.types.Collection,
        description="Multi-view from the cameras of this collection instead of the selected cameras")
    photo_lens: FloatProperty(
        name="Focal Length", default=50.0, min=1.0, soft_max=500.0, unit='CAMERA', subtype='DISTANCE_CAMERA',
        description="Focal length the photo was taken with, as a 36 mm full-frame equivalent (sets the field of "
                    "view the model assumes)")
    random_seed: BoolProperty(name="New Seed Each Time", default=False,
                              description="Draw a new seed for every generation")
    depth: FloatProperty(
        name="Distance", default=0.0, min=0.0, soft_max=100.0, unit='LENGTH',
        description="Distance from the camera to the generated object's centre; the object is scaled about the "
                    "camera so it still lines up with the image. 0 keeps the generated size")
    parent_to_camera: BoolProperty(name="Parent to Camera", default=False,
                                   description="Parent the generated object to its camera so they move together")
    model_defaults: BoolProperty(
        name="Model Defaults", default=True,
        description="Use the options the loaded model suggests (the bundled model: 6 sampler steps, 50,000 faces, "
                    "1024 px maps, sized for a CPU) instead of the values set here; the official weights suggest "
                    "none, so this changes nothing with them")


class PIXAL3D_PG_status(bpy.types.PropertyGroup):
    """What the panel shows about the running job; written only by the main-thread timer."""
    running: BoolProperty()
    cancelling: BoolProperty()
    stage: StringProperty()
    step: IntProperty()
    total: IntProperty()
    message: StringProperty()
    last_error: StringProperty()
    backend: StringProperty()       # "device, model" from the last hello
    model_options: StringProperty(default="{}")     # JSON of that model's suggested options (Model Defaults)
    # Kept in step with step/total by the timer (see options_from for why this is not a Python property).
    fraction: FloatProperty(min=0.0, max=1.0)


def model_options(status: PIXAL3D_PG_status) -> dict:
    """The options the last backend that answered suggests for its model (nothing before one has)."""
    return json.loads(status.model_options or "{}")


def option_text(name: str, value) -> str:
    """How the panel shows an option's value in words, e.g. "Face Target: 50,000"."""
    if isinstance(value, bool):
        shown = "On" if value else "Off"
    elif name in ("texture_size", "resolution"):
        shown = f"{value} px"
    else:
        shown = f"{value:,}"
    return f"{_LABELS[name]}: {shown}"


def options_from(settings: PIXAL3D_PG_settings) -> protocol.Options:
    """The protocol's options from the panel. (Not a method: Python methods and properties on a PropertyGroup
    crash the `bpy` module at exit in bpy 4.2.)"""
    values = {}
    for f in dataclasses.fields(protocol.Options):
        value = getattr(settings, f.name)
        values[f.name] = int(value) if isinstance(f.default, int) and isinstance(value, str) else value
    return protocol.Options(**values)


classes = (PIXAL3D_PG_settings, PIXAL3D_PG_status)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.pixal3d = PointerProperty(type=PIXAL3D_PG_settings)
    bpy.types.WindowManager.pixal3d = PointerProperty(type=PIXAL3D_PG_status)


def unregister():
    del bpy.types.WindowManager.pixal3d
    del bpy.types.Scene.pixal3d
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)

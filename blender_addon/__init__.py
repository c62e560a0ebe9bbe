"""Pixal3D for Blender: generate a textured object from an image or a camera's view with a local (or remote)
Pixal3D backend, and place it in the source camera's frustum."""
import bpy

from . import operators, panel, preferences, properties, runtime

_classes = (*preferences.classes, *operators.classes, *panel.classes)


def register():
    properties.register()
    for cls in _classes:
        bpy.utils.register_class(cls)


def unregister():
    runtime.shutdown()
    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
    properties.unregister()

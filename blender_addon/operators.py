"""Operators: generate, cancel, regenerate, the local backend, and the report helper used by the timer."""
from __future__ import annotations

import dataclasses
import random

import bpy
import numpy as np
from bpy.props import EnumProperty, StringProperty

from . import preferences, properties, render, rigcheck, runtime, worker
from .shared import camera as cameras
from .shared import protocol

SEED_MAX = 2**31 - 1


def input_spec(context) -> dict:
    """The inputs of a generation as chosen in the panel (also what provenance records for Regenerate)."""
    settings = context.scene.pixal3d
    spec = {"source": settings.source, "depth": settings.depth, "parent_to_camera": settings.parent_to_camera,
            "options": dataclasses.asdict(properties.options_from(settings)), "model_defaults": settings.model_defaults}
    if settings.source == "CAMERA":
        spec["cameras"] = [context.scene.camera.name] if context.scene.camera else []
    elif settings.source == "CAMERAS":
        spec["cameras"] = source_cameras(context)
    elif settings.source == "IMAGE":
        spec["image"], spec["photo_lens"] = settings.image.name if settings.image else "", settings.photo_lens
    else:
        spec["filepath"], spec["photo_lens"] = settings.filepath, settings.photo_lens
    return spec


def source_cameras(context) -> list[str]:
    """Names of the multi-view cameras: those of the panel's camera collection if one is set, else the selected
    ones; the active object (or else the scene camera) first when it is one of them: view 0."""
    collection = context.scene.pixal3d.camera_collection
    objects = collection.all_objects if collection is not None else context.selected_objects
    names = sorted(o.name for o in objects if o.type == 'CAMERA')
    active = context.active_object
    first = active.name if active is not None and active.name in names else (
        context.scene.camera.name if context.scene.camera and context.scene.camera.name in names else None)
    return ([first] if first else []) + [n for n in names if n != first]


def rig_warnings(names: list[str], views: list[worker.ViewInput]) -> list[str]:
    """The rig check of several camera renders (view 0 first); [] for one view."""
    if len(views) < 2:
        return []
    masks = [render.alpha_mask(view.png) for view in views]
    return rigcheck.check_rig(names, masks, [view.camera.intrinsics() for view in views],
                              [view.camera.c2w for view in views])


def build_job(context, spec: dict) -> tuple[worker.Job, runtime.Target]:
    """Captures the inputs (renders cameras, reads image pixels) on the main thread; raises InputError."""
    prefs = preferences.get(context)
    scene = context.scene
    create_camera = None
    if spec["source"] in ("CAMERA", "CAMERAS"):
        names = spec.get("cameras") or []
        if not names:
            raise render.InputError("no camera to render: set an active scene camera, or select cameras "
                                    "(the active one is the main view)")
        missing = [n for n in names if bpy.data.objects.get(n) is None]
        if missing:
            raise render.InputError(f"camera(s) {missing} no longer exist")
        views = [render.render_camera_view(scene, bpy.data.objects[n], prefs.render_engine, prefs.render_max_size)
                 for n in names]
        camera_world, camera_name, label = views[0].camera.c2w, names[0], names[0]
        warnings = rig_warnings(names, views)
    else:
        if spec["source"] == "IMAGE":
            image = bpy.data.images.get(spec.get("image", ""))
            if image is None:
                raise render.InputError("choose an image in the Pixal3D panel (Source: Image)")
            created = False
        else:
            image, created = render.load_image_file(spec.get("filepath", ""))
        # A camera looking along +Y at the 3D cursor; the object is placed on the cursor at import.
        camera_world = cameras.front_view_c2w(0.0)
        camera_world[:3, 3] = np.array(scene.cursor.location)
        try:
            views = [render.image_view(image, spec["photo_lens"], camera_world)]
        finally:
            label = image.name
            if created:
                bpy.data.images.remove(image)
        camera_name, warnings = None, []
        create_camera = {"lens": spec["photo_lens"], "resolution": [views[0].camera.width, views[0].camera.height]}
    options = protocol.Options(**spec["options"])
    # Provenance from before "model_defaults" recorded the options it sent as they were.
    job = worker.Job(connection=prefs.connection(), views=views, options=options, depth=spec["depth"],
                     model_defaults=spec.get("model_defaults", False))
    provenance = dict(spec, rig_warnings=warnings) if len(views) > 1 else dict(spec)
    target = runtime.Target(scene_name=scene.name, camera_world=camera_world, camera_name=camera_name,
                            name=f"Pixal3D {label}", parent_to_camera=spec["parent_to_camera"],
                            provenance=provenance, create_camera=create_camera)
    return job, target


def _start(operator, context, spec: dict) -> set:
    try:
        job, target = build_job(context, spec)
    except render.InputError as error:
        context.window_manager.pixal3d.last_error = str(error)
        operator.report({'ERROR'}, str(error))
        return {'CANCELLED'}
    for warning in target.provenance.get("rig_warnings", []):
        operator.report({'WARNING'}, warning)       # the job still runs: the user may know better
    runtime.start(job, target)
    return {'FINISHED'}


def _idle(operator_class) -> bool:
    """One job at a time: operators that start one are greyed out, with the reason, while one runs."""
    if runtime.busy():
        operator_class.poll_message_set("A Pixal3D job is running: wait for it or cancel it")
        return False
    return True


class PIXAL3D_OT_generate(bpy.types.Operator):
    """Generate a textured 3D object from the chosen source and place it in the source camera's view"""
    bl_idname = "pixal3d.generate"
    bl_label = "Generate"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        if not _idle(cls):
            return False
        settings = context.scene.pixal3d
        if settings.source == "CAMERA" and context.scene.camera is None:
            cls.poll_message_set("The scene has no active camera")
            return False
        if settings.source == "CAMERAS" and not source_cameras(context):
            cls.poll_message_set("Select the cameras to generate from, or choose a camera collection (the active "
                                 "camera is the main view)")
            return False
        if settings.source == "IMAGE" and settings.image is None:
            cls.poll_message_set("Choose an image")
            return False
        if settings.source == "FILE" and not settings.filepath:
            cls.poll_message_set("Choose an image file")
            return False
        return True

    def execute(self, context):
        settings = context.scene.pixal3d
        if settings.random_seed:
            settings.seed = random.randint(0, SEED_MAX)
        return _start(self, context, input_spec(context))


class PIXAL3D_OT_regenerate(bpy.types.Operator):
    """Generate the active Pixal3D object again from the same source and options with a new seed"""
    bl_idname = "pixal3d.regenerate"
    bl_label = "Regenerate"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        if not _idle(cls):
            return False
        obj = context.active_object
        if obj is None or "pixal3d" not in obj:
            cls.poll_message_set("Select an object made by Pixal3D")
            return False
        return True

    def execute(self, context):
        spec = context.active_object["pixal3d"].to_dict()
        spec = {k: spec[k] for k in ("source", "depth", "parent_to_camera", "options", "cameras", "image",
                                     "filepath", "photo_lens") if k in spec}
        spec["cameras"] = list(spec.get("cameras", []))
        # ID properties store booleans as ints: restore each option's type from the protocol's definition.
        recorded = spec["options"]
        spec["options"] = {f.name: type(f.default)(recorded[f.name]) for f in dataclasses.fields(protocol.Options)
                           if f.name in recorded}
        spec["options"]["seed"] = random.randint(0, SEED_MAX)
        return _start(self, context, spec)


class PIXAL3D_OT_cancel(bpy.types.Operator):
    """Cancel the running Pixal3D job (the backend stops at its next sampler step)"""
    bl_idname = "pixal3d.cancel"
    bl_label = "Cancel"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        return runtime.busy()

    def execute(self, context):
        runtime.cancel()
        return {'FINISHED'}


class PIXAL3D_OT_start_backend(bpy.types.Operator):
    """Start a local Pixal3D backend with the command from the add-on preferences (it keeps running in the
    background and loads the model once)"""
    bl_idname = "pixal3d.start_backend"
    bl_label = "Start Local Backend"

    @classmethod
    def poll(cls, context):
        return not runtime.local_backend.running

    def execute(self, context):
        prefs = preferences.get(context)
        log = bpy.utils.extension_path_user(__package__, path="logs", create=True)
        try:
            runtime.local_backend.start(prefs.backend_command, _log_path(log))
        except (ValueError, RuntimeError) as error:
            self.report({'ERROR'}, str(error))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Started the Pixal3D backend; its log is {runtime.local_backend.log_path}")
        return {'FINISHED'}


class PIXAL3D_OT_stop_backend(bpy.types.Operator):
    """Stop the local backend started from Blender"""
    bl_idname = "pixal3d.stop_backend"
    bl_label = "Stop"

    @classmethod
    def poll(cls, context):
        return runtime.local_backend.running

    def execute(self, context):
        runtime.local_backend.stop()
        return {'FINISHED'}


class PIXAL3D_OT_check_backend(bpy.types.Operator):
    """Ask the backend which model and device it runs (in the background)"""
    bl_idname = "pixal3d.check_backend"
    bl_label = "Check Connection"

    def execute(self, context):
        prefs = preferences.get(context)
        runtime.check_connection(prefs.connection())
        return {'FINISHED'}


class PIXAL3D_OT_report(bpy.types.Operator):
    """Internal: shows a message from a finished job in the status bar and the Info log"""
    bl_idname = "pixal3d.report"
    bl_label = "Pixal3D Message"
    bl_options = {'INTERNAL'}

    level: EnumProperty(items=[(k, k, "") for k in ("INFO", "WARNING", "ERROR")])
    message: StringProperty()

    def execute(self, context):
        self.report({self.level}, self.message)
        return {'FINISHED'}


def _log_path(directory: str):
    from pathlib import Path
    return Path(directory) / "backend.log"


classes = (PIXAL3D_OT_generate, PIXAL3D_OT_regenerate, PIXAL3D_OT_cancel, PIXAL3D_OT_start_backend,
           PIXAL3D_OT_stop_backend, PIXAL3D_OT_check_backend, PIXAL3D_OT_report)

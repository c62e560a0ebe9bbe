"""The "Pixal3D" tab in the 3D view's sidebar."""
import bpy

from . import operators, properties


class _SidebarPanel:
    """Where every Pixal3D panel lives: the 3D view's sidebar (N), "Pixal3D" tab."""
    bl_space_type = 'VIEW_3D'
    bl_region_type = 'UI'
    bl_category = "Pixal3D"


class _SubPanel(_SidebarPanel):
    bl_parent_id = "PIXAL3D_PT_main"


class _ClosedSubPanel(_SubPanel):
    bl_options = {'DEFAULT_CLOSED'}


def _option(layout, context, name: str) -> None:
    """An option's field, or, while Model Defaults is on and the connected model suggests this option, the model's
    value greyed out (it is what the job will send)."""
    settings, status = context.scene.pixal3d, context.window_manager.pixal3d
    suggested = properties.model_options(status)
    if settings.model_defaults and name in suggested:
        row = layout.row()
        row.active = False
        row.label(text=properties.option_text(name, suggested[name]) + " (model)")
    else:
        layout.prop(settings, name)


class PIXAL3D_PT_main(_SidebarPanel, bpy.types.Panel):
    bl_label = "Pixal3D"

    def draw(self, context):
        layout = self.layout
        settings, status = context.scene.pixal3d, context.window_manager.pixal3d
        layout.use_property_split = True
        layout.use_property_decorate = False

        col = layout.column()
        col.prop(settings, "source")
        if settings.source == "IMAGE":
            col.template_ID(settings, "image", open="image.open")
            col.prop(settings, "photo_lens")
        elif settings.source == "FILE":
            col.prop(settings, "filepath")
            col.prop(settings, "photo_lens")
        elif settings.source == "CAMERA":
            camera = context.scene.camera
            col.label(text=camera.name if camera else "No active camera", icon='CAMERA_DATA')
        else:
            col.prop(settings, "camera_collection")
            names = operators.source_cameras(context)
            where = "in the collection" if settings.camera_collection else "selected"
            col.label(text=f"{len(names)} camera(s) {where}" + (f"; main view: {names[0]}" if names else ""),
                      icon='OUTLINER_OB_CAMERA')

        col = layout.column(heading="Seed")
        row = col.row(align=True)
        row.prop(settings, "seed", text="")
        row.prop(settings, "random_seed", text="", icon='FILE_REFRESH')
        layout.prop(settings, "resolution")
        layout.prop(settings, "model_defaults")
        _option(layout, context, "face_target")
        _option(layout, context, "texture_size")

        row = layout.row(align=True)
        row.scale_y = 1.4
        if status.running:
            row.operator("pixal3d.cancel", icon='CANCEL', text="Cancelling…" if status.cancelling else "Cancel")
        else:
            row.operator("pixal3d.generate", icon='PLAY')
        if status.running:
            if status.total:
                layout.progress(factor=status.fraction, text=status.message)
            else:
                layout.label(text=status.message, icon='TIME')
        elif status.message:
            layout.label(text=status.message, icon='INFO')
        if status.last_error:
            box = layout.box()
            box.label(text="Last error", icon='ERROR')
            for line in _wrap(status.last_error, 48):
                box.label(text=line)
        if status.backend:
            layout.label(text=status.backend, icon='LINKED')


class PIXAL3D_PT_sampling(_ClosedSubPanel, bpy.types.Panel):
    bl_label = "Sampling"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        settings = context.scene.pixal3d
        for stage in ("ss", "shape", "tex"):
            col = layout.column(align=True)
            _option(col, context, f"{stage}_steps")
            col.prop(settings, f"{stage}_guidance")
        col = layout.column(heading="Mesh")
        _option(col, context, "remesh")
        col.prop(settings, "unwrap")
        _option(col, context, "normal_map")
        col.prop(settings, "low_vram")


class PIXAL3D_PT_placement(_ClosedSubPanel, bpy.types.Panel):
    bl_label = "Placement"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        settings = context.scene.pixal3d
        layout.prop(settings, "depth")
        layout.prop(settings, "parent_to_camera")


class PIXAL3D_PT_object(_SubPanel, bpy.types.Panel):
    bl_label = "Generated Object"

    @classmethod
    def poll(cls, context):
        return context.active_object is not None and "pixal3d" in context.active_object

    def draw(self, context):
        layout = self.layout
        info = context.active_object["pixal3d"]
        options = info.get("options", {})
        layout.label(text=f"Seed {options.get('seed', '?')}, {options.get('resolution', '?')} px")
        layout.label(text=f"Model {info.get('model_id', '?')}")
        layout.operator("pixal3d.regenerate", icon='FILE_REFRESH')


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


classes = (PIXAL3D_PT_main, PIXAL3D_PT_sampling, PIXAL3D_PT_placement, PIXAL3D_PT_object)

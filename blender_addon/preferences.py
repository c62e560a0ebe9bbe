"""Add-on preferences: where the backend is, the CurveZMQ keys to reach a remote one, how to start a local one,
timeouts, the camera render engine."""
import bpy
from bpy.props import EnumProperty, FloatProperty, IntProperty, StringProperty

from . import runtime, worker
from .shared import client

RENDER_ENGINES = [
    ("EEVEE", "EEVEE", "Materials and lights as in the viewport's render preview; fast on a GPU"),
    ("WORKBENCH", "Workbench", "Solid shading; the fastest, for shape-only previews and machines without a GPU"),
    ("CYCLES", "Cycles (few samples)", "Path traced with a low, denoised sample count"),
    ("SCENE", "Scene settings", "The scene's own engine and samples, exactly as F12 renders"),
]


class PIXAL3D_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    address: StringProperty(
        name="Backend Address", default=client.DEFAULT_ADDRESS,
        description="ZeroMQ address of the Pixal3D backend, tcp://host:port. 127.0.0.1 is this computer")
    server_public_key: StringProperty(
        name="Server Public Key",
        description="For a remote backend: the 40-character CurveZMQ public key that `pixal3d keys` printed. "
                    "Leave empty for a backend on this computer")
    client_public_key: StringProperty(
        name="Client Public Key",
        description="This Blender's CurveZMQ public key. A backend started with --client-keys lets in only the "
                    "clients whose public keys are in that folder: create a key here and send the public one to "
                    "whoever runs it")
    client_secret_key: StringProperty(
        name="Client Secret Key", subtype='PASSWORD',
        description="The secret half of this Blender's CurveZMQ key; it never leaves this computer")
    backend_command: StringProperty(
        name="Backend Command", default="pixal3d serve",
        description="Command line that starts a local backend (the full path to `pixal3d` if it is not on PATH)")
    timeout_s: FloatProperty(
        name="Timeout", default=client.DEFAULT_TIMEOUT_S, min=0.5, soft_max=60.0, unit='TIME_ABSOLUTE',
        description="How long to wait for the backend to answer a request before reporting it unreachable")
    render_engine: EnumProperty(
        name="Camera Render", items=RENDER_ENGINES, default="EEVEE",
        description="Engine used to render the active camera's view as the input image")
    render_max_size: IntProperty(
        name="Render Size Limit", default=1024, min=256, max=4096, subtype='PIXEL',
        description="The camera view is rendered with its longer side at most this size (the model looks at "
                    "1024 pixels or fewer)")

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        col = layout.column(heading="Connection")
        col.prop(self, "address")
        col.prop(self, "server_public_key")
        col.prop(self, "client_public_key")
        col.prop(self, "client_secret_key")
        row = col.row(align=True)
        row.operator("pixal3d.create_client_key", icon='KEY_HLT')
        row.operator("pixal3d.copy_client_key", icon='COPYDOWN')
        col.prop(self, "timeout_s")
        col = layout.column(heading="Local Backend")
        col.prop(self, "backend_command")
        row = col.row(align=True)
        row.operator("pixal3d.start_backend", icon='PLAY')
        row.operator("pixal3d.stop_backend", icon='SNAP_FACE')
        row.operator("pixal3d.check_backend", icon='FILE_REFRESH')
        col.label(text=runtime.local_backend.state())
        if runtime.status_text():
            col.label(text=runtime.status_text())
        col = layout.column(heading="Camera Input")
        col.prop(self, "render_engine")
        col.prop(self, "render_max_size")


    def connection(self) -> worker.Connection:
        """The backend's address and keys as set here; the client key counts only with CurveZMQ (a server key)."""
        server_key = self.server_public_key.strip() or None
        keypair = None
        if server_key and self.client_public_key.strip():
            keypair = (self.client_public_key.strip(), self.client_secret_key.strip())
        return worker.Connection(self.address, self.timeout_s, server_key, keypair)


class PIXAL3D_OT_create_client_key(bpy.types.Operator):
    """Create a new CurveZMQ key pair for this Blender, for backends that let in only the client keys they know"""
    bl_idname = "pixal3d.create_client_key"
    bl_label = "Create Client Key"
    bl_options = {'INTERNAL'}

    def invoke(self, context, event):
        if get(context).client_public_key:       # the old key may be the one a backend allows
            return context.window_manager.invoke_confirm(self, event, message="Replace this Blender's client key? "
                                                         "Backends that allow the old one will refuse the new one")
        return self.execute(context)

    def execute(self, context):
        prefs = get(context)
        prefs.client_public_key, prefs.client_secret_key = client.new_keypair()
        self.report({'INFO'}, "Created a client key: copy its public key to whoever runs the backend")
        return {'FINISHED'}


class PIXAL3D_OT_copy_client_key(bpy.types.Operator):
    """Copy this Blender's client public key, to send to whoever runs the backend"""
    bl_idname = "pixal3d.copy_client_key"
    bl_label = "Copy Public Key"
    bl_options = {'INTERNAL'}

    @classmethod
    def poll(cls, context):
        return bool(get(context).client_public_key)

    def execute(self, context):
        context.window_manager.clipboard = get(context).client_public_key
        self.report({'INFO'}, "Copied the client public key")
        return {'FINISHED'}


def get(context) -> PIXAL3D_AP_preferences:
    return context.preferences.addons[__package__].preferences


classes = (PIXAL3D_AP_preferences, PIXAL3D_OT_create_client_key, PIXAL3D_OT_copy_client_key)

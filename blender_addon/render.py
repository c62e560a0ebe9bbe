"""Input views read from Blender: a camera's render with a transparent film, or an image's pixels.

Rendering is the one thing the add-on does on the main thread that takes noticeable time: the operator renders
the camera once, at most `render_max_size` pixels on the longer side, with a fast engine, and restores every
render setting it touched (in `finally`), so the user's scene is unchanged afterwards.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import bpy
import numpy as np

from .shared import camera as cameras
from .shared import protocol
from .worker import ViewInput


class InputError(Exception):
    """An input the add-on cannot use; the message tells the user what to change."""


def _engine_id(choice: str) -> str:
    if choice == "WORKBENCH":
        return "BLENDER_WORKBENCH"
    if choice == "CYCLES":
        return "CYCLES"
    # EEVEE is BLENDER_EEVEE_NEXT in 4.2 - 4.x and BLENDER_EEVEE again from 5.0.
    items = bpy.types.RenderSettings.bl_rna.properties["engine"].enum_items.keys()
    return "BLENDER_EEVEE_NEXT" if "BLENDER_EEVEE_NEXT" in items else "BLENDER_EEVEE"


@contextlib.contextmanager
def overridden(settings: list[tuple[object, str, object]]):
    """Sets `(owner, attribute, value)` triples and restores the old values in reverse order on exit."""
    saved = []
    try:
        for owner, name, value in settings:
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def camera_c2w(camera_object) -> np.ndarray:
    """The camera's world matrix without scale (the protocol's camera-to-world is rigid)."""
    return np.array(camera_object.matrix_world.normalized(), dtype=np.float64)


def camera_intrinsics(camera_object, res_x: int, res_y: int) -> cameras.Intrinsics:
    data = camera_object.data
    if data.type != 'PERSP':
        raise InputError(f"camera {camera_object.name!r} is {data.type.lower()}; Pixal3D needs a perspective "
                         "camera (Camera properties > Lens > Type)")
    return cameras.blender_intrinsics(data.lens, data.sensor_width, data.sensor_height, data.sensor_fit,
                                      res_x, res_y, data.shift_x, data.shift_y)


def render_size(render, max_size: int) -> tuple[int, int, int]:
    """(percentage, width, height) of the render: the scene's own percentage, lowered so the longer side
    stays within `max_size`."""
    full_x, full_y = render.resolution_x, render.resolution_y
    percentage = render.resolution_percentage
    longest = max(full_x, full_y) * percentage / 100.0
    if longest > max_size:
        percentage = max(1, int(percentage * max_size / longest))
    return percentage, full_x * percentage // 100, full_y * percentage // 100


def render_camera_view(scene, camera_object, engine: str, max_size: int) -> ViewInput:
    """Renders `camera_object`'s view of `scene` as 8-bit RGBA PNG with a transparent film."""
    if camera_object is None or camera_object.type != 'CAMERA':
        raise InputError("the scene has no active camera: add one, or choose another source")
    render = scene.render
    if render.pixel_aspect_x != render.pixel_aspect_y:
        raise InputError("the render's pixel aspect is not square (Output properties > Format > Aspect); "
                         "set it to 1 x 1 for camera input")
    percentage, width, height = render_size(render, max_size)
    intrinsics = camera_intrinsics(camera_object, width, height)
    image = render.image_settings
    settings = [
        (scene, "camera", camera_object), (render, "film_transparent", True), (render, "resolution_percentage", percentage),
        (render, "use_border", False), (render, "use_multiview", False), (render, "use_compositing", False),
        (render, "use_sequencer", False), (image, "file_format", 'PNG'), (image, "color_mode", 'RGBA'),
        (image, "color_depth", '8'), (image, "compression", 15),
    ]
    if engine != "SCENE":
        settings.append((render, "engine", _engine_id(engine)))
    if engine == "CYCLES":
        settings += [(scene.cycles, "samples", 16), (scene.cycles, "use_denoising", True)]
    elif engine == "EEVEE":
        settings += [(scene.eevee, "taa_render_samples", 16)]
    with tempfile.TemporaryDirectory(prefix="pixal3d-") as directory:
        path = os.path.join(directory, "view.png")
        with overridden(settings + [(render, "filepath", path)]):
            bpy.ops.render.render(write_still=True, scene=scene.name)
        if not os.path.isfile(path):
            raise InputError(f"rendering camera {camera_object.name!r} produced no image")
        with open(path, "rb") as file:
            png = file.read()
    info = protocol.read_png_info(png, "camera render")
    if (info.width, info.height) != (width, height):
        raise InputError(f"the render is {info.width} x {info.height}, expected {width} x {height}")
    cam = protocol.Camera(hfov=intrinsics.hfov, width=width, height=height, c2w=camera_c2w(camera_object),
                          shift_x=intrinsics.shift[0], shift_y=intrinsics.shift[1])
    return ViewInput(camera=cam, png=png)


def alpha_mask(png: bytes, threshold: float = 0.5) -> np.ndarray:
    """The alpha of a rendered PNG as a boolean mask [H, W], rows top-down (Blender decodes it: the add-on ships
    no image library)."""
    with tempfile.TemporaryDirectory(prefix="pixal3d-") as directory:
        path = os.path.join(directory, "mask.png")
        with open(path, "wb") as file:
            file.write(png)
        image = bpy.data.images.load(path)
        try:
            width, height = image.size
            pixels = np.empty(width * height * 4, dtype=np.float32)
            image.pixels.foreach_get(pixels)
        finally:
            bpy.data.images.remove(image)
    return pixels.reshape(height, width, 4)[::-1, :, 3] > threshold


def image_view(image, lens_mm: float, c2w: np.ndarray) -> ViewInput:
    """An image's pixels, seen by a pinhole of `lens_mm` (36 mm full-frame equivalent) at `c2w`."""
    width, height = image.size
    if width == 0 or height == 0 or not image.has_data:
        raise InputError(f"image {image.name!r} has no pixels (is its file missing?)")
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    intrinsics = cameras.blender_intrinsics(lens_mm, 36.0, 24.0, "AUTO", width, height)
    cam = protocol.Camera(hfov=intrinsics.hfov, width=width, height=height, c2w=c2w)
    return ViewInput(camera=cam, pixels=pixels, linear=image.is_float)


def load_image_file(path: str):
    """Loads an image file into Blender for reading its pixels; the caller removes it if `created`."""
    absolute = bpy.path.abspath(path)
    if not path or not os.path.isfile(absolute):
        raise InputError(f"image file {path!r} does not exist: choose an image file in the Pixal3D panel")
    existing = {i.as_pointer() for i in bpy.data.images}
    try:
        image = bpy.data.images.load(absolute, check_existing=True)
    except RuntimeError as error:
        raise InputError(f"Blender cannot read {absolute!r}: {error}") from None
    return image, image.as_pointer() not in existing

"""Input preprocessing (spec §1.3): the official alpha-bounding-box crop of an RGBA image onto black.

Only images that carry their own alpha mask are handled here; background removal is a separate, optional step
that must run before this one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..protocol import OPAQUE_ALPHA

MAX_SIDE = 1024            # larger inputs are LANCZOS-downscaled first
CROP_MARGIN = 1.1          # crop side = 1.1 x the longer bbox side (TRELLIS.2 uses 1.0)


@dataclass(frozen=True)
class CropGeometry:
    """Where the square conditioning crop lies in the input image.

    `box` is the crop (x0, y0, x1, y1) in "working" pixels, i.e. after the optional downscale of large inputs;
    it may extend past the image (that part is transparent, hence black). The properties express the crop in
    input-image pixels (x right, y down, pixel edges at integers), as `camera.CropCamera.from_crop` expects.
    """
    source_size: tuple[int, int]    # (W, H) of the input image
    working_size: tuple[int, int]   # (W, H) after the downscale; equal to source_size if there was none
    box: tuple[int, int, int, int]

    @property
    def downscale(self) -> float:
        """Working pixels per input pixel (1.0 when the input was small enough)."""
        return self.working_size[0] / self.source_size[0]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2 * self.source_size[0] / self.working_size[0],
                (y0 + y1) / 2 * self.source_size[1] / self.working_size[1])

    @property
    def size(self) -> float:
        """Side of the square crop in input pixels."""
        return (self.box[2] - self.box[0]) * self.source_size[0] / self.working_size[0]


def _rgba_with_alpha(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise ValueError(f"image has no alpha mask (mode {image.mode}); remove the background first "
                         "or pass an RGBA image whose alpha marks the object")
    rgba = image.convert("RGBA")
    if np.asarray(rgba.getchannel("A")).min() == 255:
        raise ValueError("image has no alpha mask (alpha is 255 everywhere); remove the background first "
                         "or pass an RGBA image whose alpha marks the object")
    return rgba


def _working_image(image: Image.Image) -> Image.Image:
    """The RGBA image the crop is computed on: large inputs are LANCZOS-downscaled to a 1024 longer side."""
    rgba = _rgba_with_alpha(image)
    if max(rgba.size) > MAX_SIDE:
        scale = MAX_SIDE / max(rgba.size)
        rgba = rgba.resize((int(rgba.width * scale), int(rgba.height * scale)), Image.Resampling.LANCZOS)
    return rgba


def _crop_box(rgba: Image.Image) -> tuple[int, int, int, int]:
    alpha = np.asarray(rgba.getchannel("A"))
    ys, xs = np.nonzero(alpha > OPAQUE_ALPHA)      # the pixels that frame the object
    if xs.size == 0:
        raise ValueError("image alpha mask is empty: no pixel is more than 80% opaque")
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = int(max(x1 - x0, y1 - y0) * CROP_MARGIN) // 2
    # PIL rounds a float box (Python round, half to even); round here so the geometry is the crop PIL makes.
    return tuple(int(round(c)) for c in (cx - half, cy - half, cx + half, cy + half))


def crop_geometry(image: Image.Image) -> CropGeometry:
    """Where `preprocess_image` crops `image` (same validation and errors)."""
    rgba = _working_image(image)
    return CropGeometry(source_size=image.size, working_size=rgba.size, box=_crop_box(rgba))


def object_crop(image: Image.Image) -> Image.Image:
    """The square RGBA crop around the object that `preprocess_image` composites (its alpha is the object's
    silhouette in that view)."""
    rgba = _working_image(image)
    return rgba.crop(_crop_box(rgba))


def on_black(crop: Image.Image) -> Image.Image:
    """An RGBA crop composited onto black: rgb * alpha, truncated back to uint8 as the official code does."""
    rgba = np.asarray(crop).astype(np.float32) / 255
    rgb = np.clip(rgba[:, :, :3] * rgba[:, :, 3:4], 0.0, 1.0)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def preprocess_image(image: Image.Image) -> Image.Image:
    """RGBA image -> square RGB crop of the object on black (official `preprocess_image`, spec §1.3)."""
    return on_black(object_crop(image))

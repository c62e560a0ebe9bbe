"""Pixels -> the 8-bit RGBA PNG the protocol takes. Pure Python + NumPy (Blender ships no image library to
Python), run in the worker thread so the main thread only reads pixels out of Blender.
"""
from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    """The sRGB transfer function (IEC 61966-2-1) on linear values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(v, 1.0 / 2.4) - 0.055)


def rgba8_from_blender_pixels(pixels: np.ndarray, width: int, height: int, linear: bool) -> np.ndarray:
    """`Image.pixels` (float RGBA, rows bottom-up) -> uint8 [height, width, 4], rows top-down.

    Blender gives byte images' stored (display-encoded) values; float images are scene-linear, so their colour
    channels are sRGB-encoded here. Alpha is never encoded.
    """
    rgba = np.asarray(pixels, dtype=np.float32).reshape(height, width, 4)[::-1]
    if linear:
        rgba = np.concatenate([linear_to_srgb(rgba[..., :3]), rgba[..., 3:]], axis=-1)
    return (np.clip(rgba, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png_rgba(rgba: np.ndarray, level: int = 3) -> bytes:
    """uint8 [height, width, 4] -> PNG bytes (8-bit RGBA, no filtering)."""
    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    height, width, channels = rgba.shape
    if channels != 4:
        raise ValueError(f"expected RGBA pixels, got {channels} channels")
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgba.reshape(height, width * 4)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + chunk(b"IEND", b""))


def content_hash(data: bytes) -> str:
    """The provenance hash of an input image (SHA-256, hex)."""
    return hashlib.sha256(data).hexdigest()

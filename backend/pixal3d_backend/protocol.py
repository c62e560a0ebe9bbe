"""Wire protocol v1 between the Blender add-on (or any client) and the backend server: the single source of truth.

Standard library + NumPy only (no torch, no zmq, no bpy): `build_addon.py` ships this module, with `camera.py`,
inside the Blender extension, so the add-on validates exactly as the server does.

A message is a list of frames. Frame 0 is a UTF-8 JSON header `{"v": 1, "type": ..., "id": <request id>, ...}`;
further frames are binary blobs that the header references by index, either as an array
`{"blob": i, "dtype": "float32", "shape": [N, 3]}` (little-endian, C order) or as an image
`{"blob": i, "format": "png"}`. Nothing is ever pickled.

Requests and their replies (a request may always be answered by `error`):

    hello      -> capabilities
    submit     -> accepted                   (or error BUSY when the queue is full: retry later)
    status     -> job_status
    list_jobs  -> job_list
    cancel     -> cancelled
    fetch      -> result                     (or the job's error; NOT_READY while it runs)

Progress is part of `job_status`: clients poll it, which also serves as their heartbeat and survives reconnects.

`decode` is the one validator: it checks types, sizes, counts, PNG headers (without decoding pixels), camera
matrices, option ranges and unknown fields, and raises `ProtocolError(code, message)` for anything else,
with a message that says what to fix. `check(message)` runs a message through the same validation before sending.
"""
from __future__ import annotations

import enum
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, Sequence

import numpy as np

from .camera import Intrinsics

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# Limits: every bound of the wire format lives here.
# ---------------------------------------------------------------------------------------------------------
MAX_FRAMES = 16                     # header + blobs; a result has 8, a submit 1 + MAX_VIEWS
MAX_HEADER_BYTES = 1 << 20
MAX_FRAME_BYTES = 256 << 20         # any blob (result maps and arrays included)
MAX_IMAGE_BYTES = 64 << 20          # one input view's PNG
# The server's ZeroMQ socket disconnects a peer that sends a bigger frame (MAXMSGSIZE), so no peer can make it
# buffer more; frames between MAX_IMAGE_BYTES and this cut-off still reach the decoder and get TOO_LARGE.
REQUEST_FRAME_CUTOFF_BYTES = 2 * MAX_IMAGE_BYTES
MAX_VIEWS = 8
MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 8192
MAX_PNG_CHUNKS = 1 << 16            # libpng writes 8 KiB IDAT chunks: 64 MiB is 8192 of them
MIN_MASK_PIXELS = 64                # an alpha mask with fewer opaque pixels is blank
OPAQUE_ALPHA = 0.8 * 255            # "opaque": the official crop frames the pixels above 80 % alpha
MAX_CAMERA_SHIFT = 10.0             # Blender's own shift range
RIGID_TOLERANCE = 1e-4              # |R^T R - I| of a camera-to-world rotation (Blender stores float32)
MAX_VERTICES = 8_000_000
MAX_FACES = 16_000_000
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 4000               # error messages, names, versions
MAX_LISTED_JOBS = 1000
MAX_PROGRESS_TOTAL = 1_000_000

JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")   # uuid4().hex, made by the server; also a safe directory name
RESULT_MAPS = {"base_color": True, "metallic_roughness": True, "normal": False}   # name -> required


class ErrorCode(str, enum.Enum):
    """Stable error codes; clients branch on these, people read the message."""
    BAD_REQUEST = "BAD_REQUEST"                 # malformed message or field
    BAD_IMAGE = "BAD_IMAGE"                     # an input image that cannot be used
    BAD_CAMERA = "BAD_CAMERA"                   # a camera that is missing, inconsistent or not rigid
    UNKNOWN_OPTION = "UNKNOWN_OPTION"
    OPTION_OUT_OF_RANGE = "OPTION_OUT_OF_RANGE"
    UNSUPPORTED = "UNSUPPORTED"                 # valid, but the loaded model cannot do it (views, resolution)
    TOO_LARGE = "TOO_LARGE"                     # a frame, a count or an image over the limits above
    VERSION_MISMATCH = "VERSION_MISMATCH"
    BUSY = "BUSY"                               # the job queue is full: retry later
    UNKNOWN_JOB = "UNKNOWN_JOB"
    NOT_READY = "NOT_READY"                     # fetch of a job that has not finished
    CANCELLED = "CANCELLED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    INTERNAL = "INTERNAL"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATES = frozenset(state.value for state in JobState)


class ProtocolError(Exception):
    """A rejected message or a failed request; also the `error` message on the wire."""
    TYPE: ClassVar[str] = "error"

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = ErrorCode(code)
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProtocolError) and (self.code, self.message) == (other.code, other.message)

    __hash__ = Exception.__hash__

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"code": self.code.value, "message": self.message}

    @classmethod
    def _from_wire(cls, h: "_Fields", blobs: "_Blobs") -> "ProtocolError":
        code = h.text("code", MAX_ID_CHARS)
        if code not in ErrorCode.__members__:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{h.path('code')} {code!r} is not a protocol v1 error code")
        return cls(ErrorCode(code), h.text("message", MAX_TEXT_CHARS))


# ---------------------------------------------------------------------------------------------------------
# Reading JSON objects and blobs: every check names the offending field.
# ---------------------------------------------------------------------------------------------------------

class _Fields:
    """A JSON object being read. Getters raise `ProtocolError(code)` naming the field; `done()` rejects fields
    nobody asked for, so a misspelt field is an error rather than silently ignored."""

    def __init__(self, value: Any, where: str, code: ErrorCode = ErrorCode.BAD_REQUEST):
        if not isinstance(value, dict):
            raise ProtocolError(code, f"{where} must be a JSON object")
        self.values, self.where, self.code, self._read = value, where, code, set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return key in self.values

    def raw(self, key: str) -> Any:
        self._read.add(key)
        if key not in self.values:
            raise ProtocolError(self.code, f"{self.path(key)} is missing")
        return self.values[key]

    def text(self, key: str, max_chars: int) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise ProtocolError(self.code, f"{self.path(key)} must be a string")
        if len(value) > max_chars:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{self.path(key)} is longer than {max_chars} characters")
        return value

    def integer(self, key: str, low: int, high: int, nullable: bool = False) -> int | None:
        value = self.raw(key)
        if value is None and nullable:
            return None
        return _integer(value, low, high, self.path(key), self.code)

    def number(self, key: str, low: float = -math.inf, high: float = math.inf) -> float:
        return _number(self.raw(key), low, high, self.path(key), self.code)

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise ProtocolError(self.code, f"{self.path(key)} must be true or false")
        return value

    def items(self, key: str, max_items: int, min_items: int = 0) -> list:
        value = self.raw(key)
        if not isinstance(value, list):
            raise ProtocolError(self.code, f"{self.path(key)} must be a list")
        if len(value) > max_items:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{self.path(key)} has {len(value)} items; at most {max_items}")
        if len(value) < min_items:
            raise ProtocolError(self.code, f"{self.path(key)} needs at least {min_items} item(s)")
        return value

    def child(self, key: str, code: ErrorCode | None = None, nullable: bool = False) -> "_Fields | None":
        value = self.raw(key)
        if value is None and nullable:
            return None
        return _Fields(value, self.path(key), code or self.code)

    def job_state(self, key: str = "state") -> JobState:
        value = self.text(key, MAX_ID_CHARS)
        if value not in JOB_STATES:
            raise ProtocolError(self.code, f"{self.path(key)} {value!r} is not one of {sorted(JOB_STATES)}")
        return JobState(value)

    def job_id(self, key: str = "job_id") -> str:
        value = self.text(key, MAX_ID_CHARS)
        if not JOB_ID_PATTERN.fullmatch(value):
            raise ProtocolError(self.code, f"{self.path(key)} must be the 32 hex digits returned by submit")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.values) - self._read)
        if unknown:
            raise ProtocolError(self.code, f"{self.where} has unknown field(s) {unknown}")


def _integer(value: Any, low: int, high: int, where: str, code: ErrorCode,
             range_code: ErrorCode | None = None) -> int:
    if type(value) is not int:     # bool is an int subclass and 1.0 is a float: neither is an integer here
        raise ProtocolError(code, f"{where} must be an integer")
    if not low <= value <= high:
        raise ProtocolError(range_code or code, f"{where} is {value}; it must be between {low} and {high}")
    return value


def _number(value: Any, low: float, high: float, where: str, code: ErrorCode,
            range_code: ErrorCode | None = None) -> float:
    if type(value) not in (int, float):
        raise ProtocolError(code, f"{where} must be a number")
    try:
        number = float(value)
    except OverflowError:            # a JSON integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ProtocolError(code, f"{where} is {number}; it must be a finite number")
    if not low <= number <= high:
        raise ProtocolError(range_code or code, f"{where} is {number}; it must be between {low} and {high}")
    return number


def _matrix4(value: Any, where: str, code: ErrorCode) -> np.ndarray:
    """A finite 4x4 affine matrix (row-major nested lists, last row 0 0 0 1)."""
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(r, list) and len(r) == 4 for r in value)):
        raise ProtocolError(code, f"{where} must be a 4x4 matrix given as 4 rows of 4 numbers")
    m = np.array([[_number(x, -math.inf, math.inf, f"{where}[{i}][{j}]", code) for j, x in enumerate(row)]
                  for i, row in enumerate(value)], dtype=np.float64)
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0), atol=RIGID_TOLERANCE):
        raise ProtocolError(code, f"{where} last row is {m[3].tolist()}; an affine transform has 0 0 0 1")
    return m


class _Blobs:
    """The binary frames after the header. Each must be referenced exactly once."""

    def __init__(self, frames: Sequence[bytes]):
        self.frames, self._used = frames, set()

    def take(self, ref: _Fields, max_bytes: int) -> bytes:
        index = ref.integer("blob", 0, max(len(self.frames) - 1, 0))
        if index >= len(self.frames):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{ref.path('blob')} refers to a frame that was not sent")
        if index in self._used:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{ref.path('blob')} refers to frame {index} a second time")
        self._used.add(index)
        data = self.frames[index]
        if len(data) > max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{ref.where} is {len(data)} bytes; at most {max_bytes}")
        return data

    def done(self) -> None:
        unused = sorted(set(range(len(self.frames))) - self._used)
        if unused:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"binary frame(s) {[i + 1 for i in unused]} are not "
                                                       "referenced by the header")


def _put_blob(blobs: list[bytes], data: bytes) -> int:
    blobs.append(bytes(data))
    return len(blobs) - 1


def _array_to_wire(blobs: list[bytes], array: np.ndarray, dtype: str) -> dict:
    a = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"blob": _put_blob(blobs, a.tobytes()), "dtype": dtype, "shape": list(a.shape)}


def _array_from_wire(ref: _Fields, blobs: _Blobs, dtype: str, columns: int, max_rows: int) -> np.ndarray:
    """A [rows, columns] array of `dtype`. The result is a read-only view of the frame (no copy)."""
    if ref.text("dtype", MAX_ID_CHARS) != dtype:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{ref.path('dtype')} must be {dtype!r}")
    shape = ref.items("shape", 2, 2)
    rows = _integer(shape[0], 1, max_rows, f"{ref.path('shape')}[0]", ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
    if shape[1] != columns or type(shape[1]) is not int:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{ref.path('shape')} must be [N, {columns}]")
    item = np.dtype(dtype).newbyteorder("<")
    data = blobs.take(ref, MAX_FRAME_BYTES)
    if len(data) != rows * columns * item.itemsize:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{ref.where} has {len(data)} bytes but its shape {shape} of "
                                                   f"{dtype} needs {rows * columns * item.itemsize}")
    ref.done()
    array = np.frombuffer(data, dtype=item).reshape(rows, columns)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{ref.where} contains NaN or infinity")
    return array


# ---------------------------------------------------------------------------------------------------------
# PNG headers, read without decoding pixels
# ---------------------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
PNG_RGBA, PNG_RGB = 6, 2


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    bit_depth: int
    color_type: int


def read_png_info(data: bytes, where: str) -> PngInfo:
    """Size and pixel format of a PNG after checking its chunk structure and every chunk's CRC, which catches
    truncated and corrupted files without inflating the image data."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_IMAGE, f"{where} {why}")

    if len(data) == 0:
        raise bad("is empty (0 bytes)")
    if bytes(data[:8]) != PNG_SIGNATURE:
        raise bad("is not a PNG file; send 8-bit RGBA PNG bytes (convert JPEG, WebP, CMYK or EXR images first)")
    view, pos, info, chunks, seen_idat = memoryview(data), 8, None, 0, False
    while True:
        if pos + 12 > len(view):
            raise bad("is truncated: the PNG ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", view, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(view):
            raise bad(f"is truncated or corrupt: chunk {kind!r} claims {length} bytes")
        (crc,) = struct.unpack_from(">I", view, end - 4)
        if zlib.crc32(view[pos + 4:end - 4]) != crc:
            raise bad(f"is corrupt: chunk {kind!r} fails its CRC check")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise bad(f"has more than {MAX_PNG_CHUNKS} chunks")
        if info is None:
            if kind != b"IHDR" or length != 13:
                raise bad("is corrupt: a PNG must start with a 13-byte IHDR chunk")
            width, height, depth, color, _, _, _ = struct.unpack_from(">IIBBBBB", view, pos + 8)
            info = PngInfo(width, height, depth, color)
        seen_idat |= kind == b"IDAT"
        pos = end
        if kind == b"IEND":
            break
    if pos != len(view):
        raise bad(f"has {len(view) - pos} bytes of garbage after its IEND chunk")
    if not seen_idat:
        raise bad("has no image data (IDAT chunk)")
    if info.color_type not in PNG_COLOR_TYPES:
        raise bad(f"has an invalid PNG color type {info.color_type}")
    return info


def _png_from_wire(ref: _Fields, blobs: _Blobs, max_bytes: int, color_types: tuple[int, ...],
                   min_side: int) -> tuple[bytes, PngInfo]:
    if ref.text("format", MAX_ID_CHARS) != "png":
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{ref.path('format')} must be 'png'")
    data = blobs.take(ref, max_bytes)
    ref.done()
    info = read_png_info(data, ref.where)
    if not (min_side <= info.width <= MAX_IMAGE_SIDE and min_side <= info.height <= MAX_IMAGE_SIDE):
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{ref.where} is {info.width} x {info.height} pixels; each side "
                                                 f"must be between {min_side} and {MAX_IMAGE_SIDE}")
    if info.bit_depth != 8 or info.color_type not in color_types:
        wanted = " or ".join(PNG_COLOR_TYPES[c] for c in color_types)
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{ref.where} is a {info.bit_depth}-bit "
                                                 f"{PNG_COLOR_TYPES[info.color_type]} PNG; send 8-bit {wanted}")
    return bytes(data), info


def check_mask(alpha: np.ndarray, where: str) -> None:
    """Rejects a blank alpha mask (needs decoded pixels, so the server calls it after decoding the PNG)."""
    if int(np.count_nonzero(np.asarray(alpha) > OPAQUE_ALPHA)) < MIN_MASK_PIXELS:
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{where} is blank: its alpha mask has fewer than "
                                                 f"{MIN_MASK_PIXELS} pixels more than 80% opaque, which frame the "
                                                 "object; the object must be opaque (a see-through object needs "
                                                 "an opaque mask) and the background transparent")


# ---------------------------------------------------------------------------------------------------------
# Submit: views, cameras, options
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Camera:
    """A pinhole camera as Blender sees it: horizontal FOV in radians over `width` x `height` pixels, shift in
    units of max(width, height) (AUTO sensor fit), camera-to-world 4x4 (row-major, Blender world, looking -Z)."""
    hfov: float
    width: int
    height: int
    c2w: np.ndarray
    shift_x: float = 0.0
    shift_y: float = 0.0

    def intrinsics(self) -> Intrinsics:
        return Intrinsics.from_hfov(self.width, self.height, self.hfov, self.shift_x, self.shift_y)

    def _to_wire(self) -> dict:
        return {"hfov": self.hfov, "width": self.width, "height": self.height, "shift_x": self.shift_x,
                "shift_y": self.shift_y, "c2w": np.asarray(self.c2w, dtype=np.float64).tolist()}

    @classmethod
    def _from_wire(cls, c: _Fields, image: PngInfo) -> "Camera":
        if not c.has("hfov"):
            raise ProtocolError(ErrorCode.BAD_CAMERA, f"{c.path('hfov')} is missing: send the horizontal field of "
                                                      "view in radians (for a Blender camera, from lens, sensor "
                                                      "and sensor fit: camera.blender_intrinsics(...).hfov)")
        width = c.integer("width", 1, MAX_IMAGE_SIDE)
        height = c.integer("height", 1, MAX_IMAGE_SIDE)
        if (width, height) != (image.width, image.height):
            raise ProtocolError(ErrorCode.BAD_CAMERA, f"{c.where} is {width} x {height} but its image is "
                                                      f"{image.width} x {image.height}; they must match")
        camera = cls(hfov=c.number("hfov"), width=width, height=height, c2w=_matrix4(c.raw("c2w"), c.path("c2w"),
                     c.code), shift_x=c.number("shift_x", -MAX_CAMERA_SHIFT, MAX_CAMERA_SHIFT),
                     shift_y=c.number("shift_y", -MAX_CAMERA_SHIFT, MAX_CAMERA_SHIFT))
        c.done()
        try:
            camera.intrinsics()
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_CAMERA, f"{c.path('hfov')}: {error}") from None
        rotation = camera.c2w[:3, :3]
        if (np.abs(rotation.T @ rotation - np.eye(3)).max() > RIGID_TOLERANCE
                or np.linalg.det(rotation) <= 0.0):
            raise ProtocolError(ErrorCode.BAD_CAMERA, f"{c.path('c2w')} is not a rotation plus a translation; "
                                                      "clear the camera object's scale (and any parent's)")
        return camera


@dataclass
class View:
    """One input view: 8-bit RGBA PNG bytes (alpha = object mask) and the camera that saw it."""
    image_png: bytes
    camera: Camera

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"image": {"blob": _put_blob(blobs, self.image_png), "format": "png"},
                "camera": self.camera._to_wire()}

    @classmethod
    def _from_wire(cls, v: _Fields, blobs: _Blobs) -> "View":
        png, info = _png_from_wire(v.child("image", ErrorCode.BAD_IMAGE), blobs, MAX_IMAGE_BYTES, (PNG_RGBA,),
                                   MIN_IMAGE_SIDE)
        view = cls(image_png=png, camera=Camera._from_wire(v.child("camera", ErrorCode.BAD_CAMERA), info))
        v.done()
        return view


def _option(default: Any, low: float | None = None, high: float | None = None, choices: tuple = (),
            doc: str = "", added: bool = False) -> Any:
    """`added`: an option newer than the first v1 release. It is sent only when it differs from its default, so
    a backend of that release still accepts every request that does not use it (and names it when one does)."""
    return field(default=default, metadata={"low": low, "high": high, "choices": choices, "doc": doc,
                                            "added": added})


@dataclass
class Options:
    """Generation options. Each field's metadata holds its range; that is the only place ranges are defined."""
    seed: int = _option(42, 0, 2**32 - 1, doc="noise seed")
    resolution: int = _option(1024, 256, 2048, doc="shape cascade resolution; the model lists what it supports")
    ss_steps: int = _option(12, 1, 100, doc="sparse-structure sampler steps")
    ss_guidance: float = _option(7.5, 0.0, 20.0, doc="sparse-structure guidance strength")
    shape_steps: int = _option(12, 1, 100, doc="shape sampler steps (both cascade stages)")
    shape_guidance: float = _option(7.5, 0.0, 20.0, doc="shape guidance strength")
    tex_steps: int = _option(12, 1, 100, doc="texture sampler steps")
    tex_guidance: float = _option(1.0, 0.0, 20.0, doc="texture guidance strength (1 = no guidance)")
    face_target: int = _option(1_000_000, 1_000, 2_000_000, doc="faces after decimation")
    texture_size: int = _option(4096, 512, 4096, choices=(512, 1024, 2048, 4096),
                                doc="side of the PBR maps in pixels")
    remesh: bool = _option(True, doc="rebuild the surface before decimation")
    normal_map: bool = _option(False, doc="bake a tangent-space normal map")
    unwrap: str = _option("charts", choices=("charts", "xatlas"), added=True,
                          doc="texture layout: charts (faces grouped by the axis they face; about a second) or "
                              "xatlas (organic charts; a minute at 100k faces, more beyond)")
    low_vram: bool = _option(False, doc="keep models in host memory between stages, from this job on (about 3 % "
                                        "slower on a GPU, a third of the VRAM)")
    visibility_weighted: bool = _option(False, added=True,
                                        doc="several views: average each voxel's features only over the views "
                                            "that see it inside their frame (default: multi-view weights average "
                                            "over all views, as the official multi-view release does; single-view "
                                            "weights take view 0's features inside the views' visual hull)")

    def _to_wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.metadata["added"] and getattr(self, f.name) == f.default)}

    @classmethod
    def _from_wire(cls, o: _Fields) -> "Options":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(o.values) - set(known))
        if unknown:
            raise ProtocolError(ErrorCode.UNKNOWN_OPTION, f"unknown option(s) {unknown}; known options: "
                                                          f"{sorted(known)}")
        values = {}
        for name in o.values:
            spec, value, where = known[name].metadata, o.raw(name), o.path(name)
            kind = type(known[name].default)
            if kind is bool:
                values[name] = o.flag(name)
            elif kind is str:
                values[name] = o.text(name, MAX_ID_CHARS)
            elif kind is int:
                values[name] = _integer(value, spec["low"], spec["high"], where, ErrorCode.BAD_REQUEST,
                                        ErrorCode.OPTION_OUT_OF_RANGE)
            else:
                values[name] = _number(value, spec["low"], spec["high"], where, ErrorCode.BAD_REQUEST,
                                       ErrorCode.OPTION_OUT_OF_RANGE)
            if spec["choices"] and values[name] not in spec["choices"]:
                raise ProtocolError(ErrorCode.OPTION_OUT_OF_RANGE, f"{where} is {value}; choose one of "
                                                                   f"{list(spec['choices'])}")
        return cls(**values)


@dataclass
class SubmitRequest:
    """One generation. `views[0]` is the main view: the result is placed in its camera. Further views (multi-view)
    are the same object seen by other cameras of the same world, posed by their camera-to-world matrices."""
    views: list[View]
    options: Options = field(default_factory=Options)
    TYPE: ClassVar[str] = "submit"

    def check_supported(self, capabilities: "Capabilities") -> None:
        """Rejects what is valid protocol but beyond the loaded model (UNSUPPORTED)."""
        if len(self.views) > capabilities.max_views:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"{len(self.views)} views sent; the loaded model takes at "
                                                       f"most {capabilities.max_views}")
        if self.options.resolution not in capabilities.resolutions:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"options.resolution {self.options.resolution} is not "
                                                       f"supported by {capabilities.model_id}; choose one of "
                                                       f"{capabilities.resolutions}")

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"views": [v._to_wire(blobs) for v in self.views], "options": self.options._to_wire()}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "SubmitRequest":
        views = [View._from_wire(_Fields(v, f"views[{i}]"), blobs)
                 for i, v in enumerate(h.items("views", MAX_VIEWS, 1))]
        options = Options._from_wire(h.child("options")) if h.has("options") else Options()
        return cls(views, options)


# ---------------------------------------------------------------------------------------------------------
# The other messages
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Hello:
    client: str = ""            # name and version of the client, for the server's log
    TYPE: ClassVar[str] = "hello"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"client": self.client}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "Hello":
        return cls(h.text("client", MAX_TEXT_CHARS))


@dataclass
class Capabilities:
    backend_version: str
    protocol_version: int
    device: str                         # e.g. "NVIDIA H200" or "cpu"
    free_memory_bytes: int | None       # free memory of that device; None where it cannot be measured
    model_id: str
    model_hash: str
    resolutions: list[int]
    max_views: int                      # how many views a submit may carry (several: multi-view generation)
    multiview: bool                     # the loaded flows are the official multi-view fine-tunes (`*_mv`); without
                                        # them several views still condition the single-view weights
    limits: dict[str, int]              # the server's bounds, e.g. queue_size, max_image_bytes
    default_options: dict[str, Any] = field(default_factory=dict)
    # `Options` fields the loaded model suggests (its resolution, and e.g. the bundled CPU model's 6 sampler steps,
    # 50,000 faces, 1024 px maps); a client that follows the model's defaults sends these. Absent from older servers.
    TYPE: ClassVar[str] = "capabilities"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "Capabilities":
        limits = h.child("limits")
        caps = cls(backend_version=h.text("backend_version", MAX_ID_CHARS),
                   protocol_version=h.integer("protocol_version", 1, 2**31),
                   device=h.text("device", MAX_TEXT_CHARS),
                   free_memory_bytes=h.integer("free_memory_bytes", 0, 2**63, nullable=True),
                   model_id=h.text("model_id", MAX_TEXT_CHARS), model_hash=h.text("model_hash", MAX_TEXT_CHARS),
                   resolutions=[_integer(r, 1, 1 << 16, f"{h.path('resolutions')}[{i}]", h.code)
                                for i, r in enumerate(h.items("resolutions", 64, 1))],
                   max_views=h.integer("max_views", 1, MAX_VIEWS), multiview=h.flag("multiview"),
                   limits={k: limits.integer(k, 0, 2**63) for k in list(limits.values)})
        if h.has("default_options"):        # validated as options are, then only the fields the server named
            suggested = h.child("default_options")
            parsed = Options._from_wire(suggested)
            caps.default_options = {name: getattr(parsed, name) for name in suggested.values}
        return caps


@dataclass
class Accepted:
    job_id: str
    queue_position: int                 # jobs ahead of this one (0: it runs next)
    TYPE: ClassVar[str] = "accepted"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"job_id": self.job_id, "queue_position": self.queue_position}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "Accepted":
        return cls(h.job_id(), h.integer("queue_position", 0, 2**31))


@dataclass
class JobRequest:
    """Base of the requests that name one job."""
    job_id: str

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"job_id": self.job_id}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "JobRequest":
        return cls(h.job_id())


class StatusRequest(JobRequest):
    TYPE: ClassVar[str] = "status"


class CancelRequest(JobRequest):
    TYPE: ClassVar[str] = "cancel"


class FetchRequest(JobRequest):
    TYPE: ClassVar[str] = "fetch"


@dataclass
class ListJobsRequest:
    TYPE: ClassVar[str] = "list_jobs"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "ListJobsRequest":
        return cls()


@dataclass(frozen=True)
class Progress:
    stage: str                  # e.g. "sparse_structure", "shape", "texture", "export"
    step: int
    total: int
    elapsed_s: float            # since the job started running

    @classmethod
    def _from_wire(cls, p: _Fields) -> "Progress":
        total = p.integer("total", 0, MAX_PROGRESS_TOTAL)
        progress = cls(p.text("stage", MAX_ID_CHARS), p.integer("step", 0, total), total, p.number("elapsed_s", 0.0))
        p.done()
        return progress


@dataclass
class JobStatus:
    job_id: str
    state: JobState
    submitted_at: float                     # Unix time
    queue_position: int | None = None       # while queued
    progress: Progress | None = None        # once running
    error: ProtocolError | None = None      # failed or cancelled
    TYPE: ClassVar[str] = "job_status"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"job_id": self.job_id, "state": self.state.value, "submitted_at": self.submitted_at,
                "queue_position": self.queue_position,
                "progress": None if self.progress is None else {f.name: getattr(self.progress, f.name)
                                                                 for f in fields(self.progress)},
                "error": None if self.error is None else self.error._to_wire(blobs)}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "JobStatus":
        progress, error = h.child("progress", nullable=True), h.child("error", nullable=True)
        status = cls(h.job_id(), h.job_state(), h.number("submitted_at", 0.0),
                     h.integer("queue_position", 0, 2**31, nullable=True),
                     None if progress is None else Progress._from_wire(progress),
                     None if error is None else ProtocolError._from_wire(error, blobs))
        if error is not None:
            error.done()
        return status


@dataclass
class JobList:
    jobs: list[JobStatus]
    TYPE: ClassVar[str] = "job_list"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"jobs": [job._to_wire(blobs) for job in self.jobs]}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "JobList":
        jobs = []
        for i, item in enumerate(h.items("jobs", MAX_LISTED_JOBS)):
            j = _Fields(item, f"jobs[{i}]")
            jobs.append(JobStatus._from_wire(j, blobs))
            j.done()
        return cls(jobs)


@dataclass
class Cancelled:
    job_id: str
    state: JobState     # cancelled, or running until the job reaches its next cancellation point, or finished
    TYPE: ClassVar[str] = "cancelled"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"job_id": self.job_id, "state": self.state.value}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "Cancelled":
        return cls(h.job_id(), h.job_state())


@dataclass
class Result:
    """A generated mesh in the official GLB frame (Y up) with per-vertex UVs and normals, its PBR maps as PNG
    bytes, and `glb_to_camera`, the 4x4 affine from that frame into the source camera (camera.CropCamera).
    Arrays decoded from the wire are read-only views of the received frames."""
    positions: np.ndarray               # float32 [V, 3]
    faces: np.ndarray                   # uint32 [F, 3]
    uvs: np.ndarray                     # float32 [V, 2]
    normals: np.ndarray                 # float32 [V, 3]
    maps: dict[str, bytes]              # base_color (RGBA), metallic_roughness (R unused, G rough, B metal), normal?
    glb_to_camera: np.ndarray           # float64 [4, 4]
    metadata: dict[str, Any] = field(default_factory=dict)   # seed, options, model id/hash, timings, ...
    job_id: str = ""                    # filled in by the server
    TYPE: ClassVar[str] = "result"

    def _to_wire(self, blobs: list[bytes]) -> dict:
        return {"job_id": self.job_id,
                "positions": _array_to_wire(blobs, self.positions, "float32"),
                "faces": _array_to_wire(blobs, self.faces, "uint32"),
                "uvs": _array_to_wire(blobs, self.uvs, "float32"),
                "normals": _array_to_wire(blobs, self.normals, "float32"),
                "maps": {name: {"blob": _put_blob(blobs, png), "format": "png"} for name, png in self.maps.items()},
                "glb_to_camera": np.asarray(self.glb_to_camera, dtype=np.float64).tolist(),
                "metadata": self.metadata}

    @classmethod
    def _from_wire(cls, h: _Fields, blobs: _Blobs) -> "Result":
        job_id = h.job_id()
        positions = _array_from_wire(h.child("positions"), blobs, "float32", 3, MAX_VERTICES)
        vertices = len(positions)
        faces = _array_from_wire(h.child("faces"), blobs, "uint32", 3, MAX_FACES)
        if faces.max() >= vertices:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"header.faces index {int(faces.max())} is out of range for "
                                                       f"{vertices} vertices")
        per_vertex = {}
        for name, columns in (("uvs", 2), ("normals", 3)):
            per_vertex[name] = _array_from_wire(h.child(name), blobs, "float32", columns, MAX_VERTICES)
            if len(per_vertex[name]) != vertices:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"header.{name} has {len(per_vertex[name])} rows for "
                                                           f"{vertices} vertices")
        m = h.child("maps")
        maps = {}
        for name, required in RESULT_MAPS.items():
            if required or m.has(name):
                maps[name], _ = _png_from_wire(m.child(name), blobs, MAX_FRAME_BYTES, (PNG_RGB, PNG_RGBA), 1)
        m.done()
        metadata = h.raw("metadata")
        if not isinstance(metadata, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "header.metadata must be a JSON object")
        try:
            json.dumps(metadata, allow_nan=False)
        except (ValueError, RecursionError):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "header.metadata must be plain JSON without NaN, "
                                                       "infinity or deep nesting") from None
        return cls(positions, faces, per_vertex["uvs"], per_vertex["normals"], maps,
                   _matrix4(h.raw("glb_to_camera"), h.path("glb_to_camera"), h.code), metadata, job_id)


Message = (Hello | Capabilities | SubmitRequest | Accepted | StatusRequest | JobStatus | ListJobsRequest | JobList
           | CancelRequest | Cancelled | FetchRequest | Result | ProtocolError)
MESSAGE_TYPES: dict[str, type] = {cls.TYPE: cls for cls in (
    Hello, Capabilities, SubmitRequest, Accepted, StatusRequest, JobStatus, ListJobsRequest, JobList,
    CancelRequest, Cancelled, FetchRequest, Result, ProtocolError)}
REQUEST_TYPES = (Hello, SubmitRequest, StatusRequest, ListJobsRequest, CancelRequest, FetchRequest)


# ---------------------------------------------------------------------------------------------------------
# Encoding and decoding
# ---------------------------------------------------------------------------------------------------------

class Decoded(NamedTuple):
    request_id: str
    message: Message


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):        # numpy scalars that slipped into options or metadata
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot be sent in a protocol header")


def encode(message: Message, request_id: str) -> list[bytes]:
    """Frames of `message`. Encoding does not validate (`decode` and `check` do): a NaN written here as the JSON
    literal `NaN` is reported by the receiver with the field it is in."""
    blobs: list[bytes] = []
    body = message._to_wire(blobs)
    header = {"v": PROTOCOL_VERSION, "type": message.TYPE, "id": request_id, **body}
    return [json.dumps(header, separators=(",", ":"), default=_json_default).encode("utf-8"), *blobs]


def decode(frames: Sequence[bytes]) -> Decoded:
    """The message in `frames`, fully validated; raises ProtocolError for anything that is not valid v1."""
    if len(frames) == 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "empty message: expected a JSON header frame")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message has {len(frames)} frames; at most {MAX_FRAMES}")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header frame is {len(frames[0])} bytes; at most "
                                                 f"{MAX_HEADER_BYTES}")
    for i, frame in enumerate(frames[1:], 1):
        if len(frame) > MAX_FRAME_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"frame {i} is {len(frame)} bytes; at most {MAX_FRAME_BYTES}")
    h = _Fields(_parse_header(frames[0]), "header")
    version = h.raw("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"message is protocol version {version!r}; this side speaks "
                                                        f"v{PROTOCOL_VERSION}: update the add-on and the backend "
                                                        "to the same release")
    kind = h.text("type", MAX_ID_CHARS)
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown message type {kind!r}; known: {sorted(MESSAGE_TYPES)}")
    request_id = h.text("id", MAX_ID_CHARS)
    blobs = _Blobs(frames[1:])
    message = MESSAGE_TYPES[kind]._from_wire(h, blobs)
    h.done()
    blobs.done()
    return Decoded(request_id, message)


def _parse_header(frame: bytes) -> Any:
    try:
        return json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"header frame is not UTF-8 JSON ({error})") from None


def peek_request_id(frames: Sequence[bytes]) -> str:
    """The request id of a message that failed to decode, so the error reply still reaches the right request;
    "" when it cannot be read."""
    try:
        header = json.loads(bytes(frames[0]).decode("utf-8")) if frames and len(frames[0]) <= MAX_HEADER_BYTES \
            else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    request_id = header.get("id") if isinstance(header, dict) else None
    return request_id if isinstance(request_id, str) and len(request_id) <= MAX_ID_CHARS else ""


def check(message: Message) -> Message:
    """Validates `message` exactly as its receiver will (raises ProtocolError) and returns the decoded copy."""
    return decode(encode(message, "")).message

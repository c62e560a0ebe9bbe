"""Protocol v1: every message survives a round trip, and every class of bad input a user or a broken client can
produce is rejected with the error code the add-on branches on."""
import io
import json
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pixal3d_backend import protocol
from pixal3d_backend.camera import front_view_c2w
from pixal3d_backend.protocol import (Accepted, Camera, Cancelled, CancelRequest, Capabilities, ErrorCode,
                                      FetchRequest, Hello, JobList, JobState, JobStatus, ListJobsRequest, Options,
                                      Progress, ProtocolError, Result, StatusRequest, SubmitRequest, View)

JOB_ID = "0123456789abcdef0123456789abcdef"


# ---------------------------------------------------------------------------------------------------------
# Builders of real inputs, shared with test_server.py and test_protocol_fuzz.py
# ---------------------------------------------------------------------------------------------------------

def object_png(width: int = 96, height: int = 64, blank: bool = False) -> bytes:
    """An 8-bit RGBA PNG of a red disc on a transparent background (the alpha is the object mask)."""
    y, x = np.mgrid[0:height, 0:width]
    inside = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0 if blank else np.where(inside, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def synthetic_png(width: int, height: int, bit_depth: int = 8, color_type: int = 6) -> bytes:
    """A structurally valid PNG of any size and pixel format, with all-zero pixels (cheap even at 1 x 100000)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = 1 + math.ceil(width * channels * bit_depth / 8)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (protocol.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(row * height)))
            + chunk(b"IEND", b""))


def camera_for(width: int, height: int, hfov: float = 0.8) -> Camera:
    return Camera(hfov=hfov, width=width, height=height, c2w=front_view_c2w(2.5), shift_x=0.05, shift_y=-0.02)


def object_view(width: int = 96, height: int = 64) -> View:
    return View(object_png(width, height), camera_for(width, height))


def submit_request(**options) -> SubmitRequest:
    return SubmitRequest([object_view()], Options(**options))


def small_result(job_id: str = JOB_ID) -> Result:
    positions = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) * 0.5
    return Result(positions=positions, faces=np.array([[0, 1, 2], [0, 2, 3]], np.uint32),
                  uvs=positions[:, :2].copy(), normals=np.tile(np.float32([0, 0, 1]), (4, 1)),
                  maps={"base_color": object_png(32, 32), "metallic_roughness": synthetic_png(32, 32, 8, 2)},
                  glb_to_camera=np.diag([-1.0, 1.0, -1.0, 1.0]), metadata={"seed": 7, "stages": ["a", "b"]},
                  job_id=job_id)


def submit_frames(mutate=None, blobs=None) -> list[bytes]:
    """Frames of a valid submit whose JSON header `mutate(header)` may edit; `blobs` replaces the image frames."""
    frames = protocol.encode(submit_request(), "req-1")
    header = json.loads(frames[0])
    if mutate is not None:
        mutate(header)
    return [json.dumps(header).encode(), *(frames[1:] if blobs is None else blobs)]


def roundtrip(message):
    frames = protocol.encode(message, "req-7")
    request_id, decoded = protocol.decode(frames)
    assert request_id == "req-7"
    assert type(decoded) is type(message)
    assert protocol.encode(decoded, "req-7") == frames     # byte-identical: nothing lost or altered
    return decoded


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

def test_module_is_importable_without_torch_zmq_or_bpy():
    import subprocess
    import sys
    code = ("import sys, pixal3d_backend.protocol; "
            "print(sorted(m for m in ('torch', 'zmq', 'bpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("message", [
    Hello("blender-addon 0.1"),
    Capabilities("0.1.0", 1, "NVIDIA H200", 140 << 30, "TencentARC/Pixal3D", "sha256:ab12", [1024, 1536], 4, True,
                 {"queue_size": 4, "max_image_bytes": protocol.MAX_IMAGE_BYTES}),
    Capabilities("0.1.0", 1, "cpu", None, "default", "sha256:00", [512], 1, False, {}),
    Capabilities("0.1.0", 1, "cpu", None, "default", "sha256:00", [256], 8, False, {"queue_size": 4},
                 {"resolution": 256, "ss_steps": 6, "face_target": 50_000, "texture_size": 1024, "remesh": True}),
    Accepted(JOB_ID, 2),
    StatusRequest(JOB_ID), CancelRequest(JOB_ID), FetchRequest(JOB_ID), ListJobsRequest(),
    JobStatus(JOB_ID, JobState.QUEUED, 1.7e9, queue_position=1),
    JobStatus(JOB_ID, JobState.RUNNING, 1.7e9, progress=Progress("shape", 3, 12, 41.5)),
    JobStatus(JOB_ID, JobState.FAILED, 1.7e9, progress=Progress("texture", 0, 12, 80.0),
              error=ProtocolError(ErrorCode.OUT_OF_MEMORY, "turn on low_vram")),
    JobList([JobStatus(JOB_ID, JobState.DONE, 1.7e9), JobStatus("f" * 32, JobState.CANCELLED, 1.8e9)]),
    Cancelled(JOB_ID, JobState.RUNNING),
    ProtocolError(ErrorCode.BUSY, "queue full"),
], ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(message):
    assert roundtrip(message) == message


def test_submit_round_trips_images_cameras_and_options():
    request = SubmitRequest([object_view(96, 64), object_view(64, 64)],
                            Options(seed=9, resolution=1536, ss_steps=20, ss_guidance=5.0, shape_steps=8,
                                    shape_guidance=6.0, tex_steps=4, tex_guidance=2.0, face_target=50_000,
                                    texture_size=1024, remesh=False, normal_map=True, low_vram=True))
    decoded = roundtrip(request)
    assert [v.image_png for v in decoded.views] == [v.image_png for v in request.views]
    np.testing.assert_array_equal(decoded.views[0].camera.c2w, front_view_c2w(2.5))
    assert decoded.views[0].camera.intrinsics() == request.views[0].camera.intrinsics()
    assert decoded.options == request.options


def test_submit_without_options_gets_the_documented_defaults():
    decoded = protocol.decode(submit_frames(lambda h: h.pop("options"))).message
    assert decoded.options == Options()


def test_result_round_trips_arrays_exactly():
    result = small_result()
    decoded = roundtrip(result)
    for name in ("positions", "faces", "uvs", "normals", "glb_to_camera"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(result, name))
    assert decoded.faces.dtype == np.uint32 and decoded.positions.dtype == np.float32
    assert decoded.glb_to_camera.dtype == np.float64
    assert decoded.maps == result.maps and decoded.metadata == result.metadata


def test_result_with_a_normal_map_round_trips():
    result = small_result()
    result.maps["normal"] = synthetic_png(16, 16, 8, 2)
    assert roundtrip(result).maps["normal"] == result.maps["normal"]


def test_check_supported_rejects_what_the_model_cannot_do():
    caps = Capabilities("0.1.0", 1, "cpu", None, "single-view-model", "h", [1024], 1, False, {})
    with pytest.raises(ProtocolError) as error:
        SubmitRequest([object_view(), object_view()]).check_supported(caps)
    assert error.value.code is ErrorCode.UNSUPPORTED and "at most 1" in error.value.message
    with pytest.raises(ProtocolError) as error:
        submit_request(resolution=1536).check_supported(caps)
    assert error.value.code is ErrorCode.UNSUPPORTED and "[1024]" in error.value.message
    submit_request(resolution=1024).check_supported(caps)


def test_capabilities_carry_the_models_suggested_options_validated_as_options_are():
    caps = Capabilities("0.1.0", 1, "cpu", None, "default", "h", [256], 1, False, {}, {"face_target": 50_000})
    header = json.loads(protocol.encode(caps, "r")[0])
    header["default_options"]["face_target"] = 10           # below Options' range
    with pytest.raises(ProtocolError) as error:
        protocol.decode([json.dumps(header).encode()])
    assert error.value.code is ErrorCode.OPTION_OUT_OF_RANGE and "face_target" in error.value.message
    header["default_options"] = {"faces": 50_000}
    with pytest.raises(ProtocolError, match="unknown option"):
        protocol.decode([json.dumps(header).encode()])
    del header["default_options"]                            # a server from before the field: no suggestions
    assert protocol.decode([json.dumps(header).encode()]).message.default_options == {}


def test_single_view_weights_still_take_several_views():
    """`multiview` says whether the weights are the multi-view fine-tunes; `max_views` alone bounds the views."""
    caps = Capabilities("0.1.0", 1, "cpu", None, "default", "h", [1024], 8, False, {})
    SubmitRequest([object_view(), object_view(), object_view()], Options(resolution=1024)).check_supported(caps)


@pytest.mark.parametrize("name, used", [("visibility_weighted", True), ("unwrap", "xatlas")])
def test_an_option_added_after_the_first_release_is_sent_only_when_used(name, used):
    """A v1 backend of the first release rejects unknown options, so a new option at its default stays off the
    wire (the request means the same), and when used it round-trips."""
    header = json.loads(protocol.encode(submit_request(), "r")[0])
    assert name not in header["options"]
    assert getattr(roundtrip(submit_request()).options, name) == getattr(Options(), name) != used
    request = submit_request()
    setattr(request.options, name, used)
    assert json.loads(protocol.encode(request, "r")[0])["options"][name] == used
    assert getattr(roundtrip(request).options, name) == used


# ---------------------------------------------------------------------------------------------------------
# Bad input, by class (issue 8). Each case: frames a broken or hostile client could send -> expected code.
# ---------------------------------------------------------------------------------------------------------

def _with_image(png: bytes, width: int, height: int):
    def mutate(header):
        header["views"][0]["camera"].update(width=width, height=height)
    return submit_frames(mutate, [png])


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def _set(path, value):
    def mutate(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _drop(path):
    def mutate(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def _nan_in_c2w(header):
    header["views"][0]["camera"]["c2w"][1][2] = float("nan")


def _corrupt(png: bytes) -> bytes:
    damaged = bytearray(png)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


BAD_INPUTS = {
    "corrupt PNG": (lambda: submit_frames(blobs=[_corrupt(object_png())]), ErrorCode.BAD_IMAGE),
    "truncated PNG": (lambda: submit_frames(blobs=[object_png()[:-20]]), ErrorCode.BAD_IMAGE),
    "zero-byte image": (lambda: submit_frames(blobs=[b""]), ErrorCode.BAD_IMAGE),
    "zero-size image": (lambda: _with_image(synthetic_png(0, 64), 0, 64), ErrorCode.BAD_IMAGE),
    "1 x 100000 image": (lambda: _with_image(synthetic_png(1, 100_000), 1, 100_000), ErrorCode.BAD_IMAGE),
    "16-bit PNG": (lambda: _with_image(synthetic_png(64, 64, 16, 6), 64, 64), ErrorCode.BAD_IMAGE),
    "CMYK JPEG": (lambda: _with_image(_cmyk_jpeg(), 64, 64), ErrorCode.BAD_IMAGE),
    "palette PNG": (lambda: _with_image(synthetic_png(64, 64, 8, 3), 64, 64), ErrorCode.BAD_IMAGE),
    "RGB PNG without alpha": (lambda: _with_image(synthetic_png(64, 64, 8, 2), 64, 64), ErrorCode.BAD_IMAGE),
    "non-square camera without FOV": (lambda: submit_frames(_drop(["views", 0, "camera", "hfov"])),
                                      ErrorCode.BAD_CAMERA),
    "FOV of 180 degrees": (lambda: submit_frames(_set(["views", 0, "camera", "hfov"], math.pi)),
                           ErrorCode.BAD_CAMERA),
    "camera size unlike the image": (lambda: submit_frames(_set(["views", 0, "camera", "width"], 95)),
                                     ErrorCode.BAD_CAMERA),
    "NaN in a matrix": (lambda: submit_frames(_nan_in_c2w), ErrorCode.BAD_CAMERA),
    "scaled camera matrix": (lambda: submit_frames(_set(["views", 0, "camera", "c2w", 0, 0], 2.0)),
                             ErrorCode.BAD_CAMERA),
    "unknown option": (lambda: submit_frames(_set(["options", "stepz"], 3)), ErrorCode.UNKNOWN_OPTION),
    "option out of range": (lambda: submit_frames(_set(["options", "ss_steps"], 0)),
                            ErrorCode.OPTION_OUT_OF_RANGE),
    "texture size not offered": (lambda: submit_frames(_set(["options", "texture_size"], 3000)),
                                 ErrorCode.OPTION_OUT_OF_RANGE),
    "option of the wrong type": (lambda: submit_frames(_set(["options", "remesh"], 1)), ErrorCode.BAD_REQUEST),
    "unwrap method not offered": (lambda: submit_frames(_set(["options", "unwrap"], "lscm")),
                                  ErrorCode.OPTION_OUT_OF_RANGE),
    "unwrap method that is not text": (lambda: submit_frames(_set(["options", "unwrap"], 1)), ErrorCode.BAD_REQUEST),
    "oversized image frame": (lambda: submit_frames(blobs=[bytes(protocol.MAX_IMAGE_BYTES + 1)]),
                              ErrorCode.TOO_LARGE),
    "too many views": (lambda: submit_frames(lambda h: h.update(views=h["views"] * (protocol.MAX_VIEWS + 1)),
                                             [object_png()] * (protocol.MAX_VIEWS + 1)), ErrorCode.TOO_LARGE),
    "wrong protocol version": (lambda: submit_frames(_set(["v"], 2)), ErrorCode.VERSION_MISMATCH),
    "header is not JSON": (lambda: [b"\x89PNG not json", object_png()], ErrorCode.BAD_REQUEST),
    "unknown message type": (lambda: submit_frames(_set(["type"], "render")), ErrorCode.BAD_REQUEST),
    "unreferenced extra frame": (lambda: submit_frames(blobs=[object_png(), b"extra"]), ErrorCode.BAD_REQUEST),
    "job id that is a path": (lambda: protocol.encode(CancelRequest("../../etc/passwd"), "r"),
                              ErrorCode.BAD_REQUEST),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_with_its_code(case):
    build, code = BAD_INPUTS[case]
    with pytest.raises(ProtocolError) as error:
        protocol.decode(build())
    assert error.value.code is code, error.value.message
    assert len(error.value.message) > 20        # words that say what to fix, not just a code


def test_messages_name_the_field_and_the_fix():
    with pytest.raises(ProtocolError) as error:
        protocol.decode(_with_image(synthetic_png(64, 64, 16, 6), 64, 64))
    assert "views[0].image" in error.value.message and "8-bit RGBA" in error.value.message
    with pytest.raises(ProtocolError) as error:
        protocol.decode(submit_frames(_set(["options", "stepz"], 3)))
    assert "stepz" in error.value.message and "ss_steps" in error.value.message
    with pytest.raises(ProtocolError) as error:
        protocol.decode(submit_frames(_nan_in_c2w))
    assert "c2w[1][2]" in error.value.message


def test_blank_mask_is_rejected():
    alpha = np.asarray(Image.open(io.BytesIO(object_png(blank=True))).getchannel("A"))
    with pytest.raises(ProtocolError) as error:
        protocol.check_mask(alpha, "views[0].image")
    assert error.value.code is ErrorCode.BAD_IMAGE and "blank" in error.value.message
    protocol.check_mask(np.asarray(Image.open(io.BytesIO(object_png())).getchannel("A")), "views[0].image")
    see_through = np.full((64, 64), 180, np.uint8)      # a glass object at 70 % alpha: nothing for the crop to frame
    with pytest.raises(ProtocolError, match="80% opaque"):
        protocol.check_mask(see_through, "views[0].image")


def test_result_with_a_face_index_past_the_vertices_is_rejected():
    result = small_result()
    result.faces = np.array([[0, 1, 4]], np.uint32)
    with pytest.raises(ProtocolError) as error:
        protocol.check(result)
    assert "out of range" in error.value.message


def test_result_with_nan_positions_is_rejected():
    result = small_result()
    result.positions = result.positions.copy()
    result.positions[1, 1] = np.nan
    with pytest.raises(ProtocolError, match="NaN"):
        protocol.check(result)


def test_request_id_of_an_undecodable_message_is_still_readable():
    assert protocol.peek_request_id(submit_frames(_set(["v"], 2))) == "req-1"
    assert protocol.peek_request_id([b"\xff\xfe"]) == ""

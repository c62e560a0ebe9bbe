"""Fuzzing the protocol decoder: whatever arrives, `decode` returns a message or raises ProtocolError, quickly.

CI runs 200 examples per strategy. The issue-8 acceptance run (>= 100k inputs in total):
    PIXAL3D_FUZZ_EXAMPLES=35000 pytest tests/test_protocol_fuzz.py -q
"""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixal3d_backend import protocol
from pixal3d_backend.protocol import ProtocolError

from test_protocol import small_result, submit_request, synthetic_png

EXAMPLES = int(os.environ.get("PIXAL3D_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, database=None,   # deadline: a slow input is a hang
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID_MESSAGES = [protocol.encode(submit_request(), "r1"), protocol.encode(small_result(), "r2"),
                  protocol.encode(protocol.StatusRequest("a" * 32), "r3"),
                  protocol.encode(protocol.JobStatus("b" * 32, protocol.JobState.RUNNING, 1.0,
                                                     progress=protocol.Progress("shape", 2, 12, 3.0)), "r4")]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**400, 10**400) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12)
FIELD_NAMES = st.sampled_from(["v", "type", "id", "views", "options", "image", "camera", "blob", "dtype", "shape",
                               "format", "hfov", "width", "height", "c2w", "job_id", "positions", "faces", "maps",
                               "state", "progress", "error", "code", "message", "metadata", "seed"])


def decode_or_reject(frames):
    try:
        protocol.decode(frames)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_frames(frames):
    decode_or_reject(frames)


@FUZZ
@given(st.sampled_from(sorted(protocol.MESSAGE_TYPES)), st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=8),
       st.lists(st.sampled_from([b"", b"\x00" * 12, synthetic_png(40, 40), synthetic_png(1, 3, 16, 2)]),
                max_size=3))
def test_headers_of_real_message_types_with_random_fields(kind, fields, blobs):
    header = {"v": 1, "type": kind, "id": "x", **fields}
    decode_or_reject([json.dumps(header).encode(), *blobs])


@st.composite
def mutated_valid_messages(draw):
    """A valid message with one part of its JSON header replaced by a random value, or its bytes damaged."""
    frames = list(draw(st.sampled_from(VALID_MESSAGES)))
    if draw(st.booleans()):
        header = json.loads(frames[0])
        target, path = header, []
        while isinstance(target, (dict, list)) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target))))
            path.append(key)
            parent, target = target, target[key]
        if path:
            parent[path[-1]] = draw(JSON_VALUES)
        frames[0] = json.dumps(header).encode()
    else:
        index = draw(st.integers(0, len(frames) - 1))
        data = bytearray(frames[index])
        for _ in range(draw(st.integers(1, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        frames[index] = bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    return frames


@FUZZ
@given(mutated_valid_messages())
def test_mutated_valid_messages(frames):
    decode_or_reject(frames)


def test_deeply_nested_header_is_a_protocol_error():
    nested = b"[" * 200_000 + b"]" * 200_000
    for header in (nested, b'{"v":1,"type":"hello","id":"x","client":' + nested + b"}"):
        with pytest.raises(ProtocolError):
            protocol.decode([header])

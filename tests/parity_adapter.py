"""Adapter between `../shared/parity/check.py` and our implementation.

check.py calls `run_fixture(fixture_name, kind, model, inputs, meta)` with the fixture's inputs and our model
(built by `pixal3d_backend.models.build_model` and loaded strictly). Each fixture kind is run by a function in
`tests/_parity/<area>.py`, which exports a `RUNNERS` dict {kind: fn(model, inputs, meta) -> {output: tensor}}.
"""
import importlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_AREAS = ("flows", "decoders", "conditioning", "pipeline")


def _runners() -> dict:
    runners = {}
    for area in _AREAS:
        if os.path.exists(os.path.join(_HERE, "_parity", f"{area}.py")):
            runners.update(importlib.import_module(f"_parity.{area}").RUNNERS)
    return runners


def run_fixture(fixture_name, kind, model, inputs, meta):
    runners = _runners()
    if kind not in runners:
        raise NotImplementedError(f"no runner for fixture kind {kind!r} (fixture {fixture_name})")
    return runners[kind](model, inputs, meta)

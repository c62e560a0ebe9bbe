"""Every parity fixture in PIXAL3D_PARITY_DIR, run through the official checker with our implementation.

Fixtures are discovered from their JSON files (no names are hard-coded): a JSON with a `fixture` block is a
fixture. Each one runs `check.py --only <name>` in a subprocess, exactly as CI and other tools run it.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import PARITY_DIR, REPO


def _fixture_names():
    if not PARITY_DIR.is_dir():
        return ["<missing parity dir>"]
    names = []
    for p in sorted(PARITY_DIR.glob("*.json")):
        try:
            meta = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("fixture"), dict):
            names.append(p.stem)
    return names


@pytest.mark.parametrize("name", _fixture_names())
def test_fixture_matches_official(name, parity_dir):
    cmd = [sys.executable, str(parity_dir / "check.py"), "--fixtures", str(parity_dir),
           "--impl", "pixal3d_backend.models:build_model", "--adapter", "parity_adapter:run_fixture",
           "--path", str(REPO / "tests"), "--only", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO / "backend")})
    assert proc.returncode == 0, f"check.py failed for {name}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"

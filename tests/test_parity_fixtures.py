"""Every parity fixture in PIXAL3D_PARITY_DIR, run through the official checker with our implementation.

Fixtures are discovered from their JSON files (no names are hard-coded): a JSON with a `fixture` block is a
fixture. `check.py` runs once, as CI and other tools run it (`--impl pixal3d_backend.models:build_model --adapter
parity_adapter:run_fixture`), over all of them; each fixture is then its own test, failing with the checker's
report for it. A second run with `--perturb-one-weight` proves the check can fail: every fixture with weights must.
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


def _check(parity_dir, out, *extra):
    cmd = [sys.executable, str(parity_dir / "check.py"), "--fixtures", str(parity_dir),
           "--impl", "pixal3d_backend.models:build_model", "--adapter", "parity_adapter:run_fixture",
           "--path", str(REPO / "tests"), "--json-out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(REPO / "backend")})
    if not out.exists():
        pytest.fail(f"check.py produced no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc, {r["fixture"]: r for r in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def report(parity_dir, tmp_path_factory):
    return _check(parity_dir, tmp_path_factory.mktemp("parity") / "report.json")


@pytest.mark.parametrize("name", _fixture_names())
def test_fixture_matches_official(name, report):
    proc, results = report
    assert name in results, f"check.py did not run {name}:\n{proc.stdout[-4000:]}"
    rec = results[name]
    failed = [o for o in rec["outputs"] if o["status"] == "FAIL"]
    assert rec["status"] in ("PASS", "INFO-FAIL"), (
        f"{name}: {rec['status']} {rec.get('error', '')}\nload: {rec['load']}\nfailed outputs: {failed}")


@pytest.mark.slow
def test_checker_detects_a_perturbed_weight(parity_dir, tmp_path):
    _, results = _check(parity_dir, tmp_path / "perturbed.json", "--perturb-one-weight",
                        "--skip", "pipeline_e2e,sampler_ss_12steps,sampler_shape_12steps,sampler_tex_12steps")
    perturbed = {n: r for n, r in results.items() if r.get("perturbed")}
    assert perturbed, "no fixture had weights to perturb"
    informational = {"ss_flow_bf16"}          # its tolerance is deliberately loose (parity README §4)
    survived = [n for n, r in perturbed.items() if r["status"] == "PASS" and n not in informational]
    assert not survived, f"a perturbed weight went unnoticed in {survived}"

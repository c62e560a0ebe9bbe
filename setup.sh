#!/usr/bin/env bash
# Creates .venv with everything the backend, the tests and the add-on build need (CPU build of PyTorch; Triton
# for the kernels' tests, which run through its interpreter without a GPU).
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" -e "kernels[triton]" -e "backend[spconv]" "transformers==4.57.3" \
    "triton==3.6.0" "pytest>=8" "hypothesis>=6" "bpy==4.2.*"
# The pyzmq wheels the add-on bundles, for the offline packaging test (fetched here, at install time).
.venv/bin/python build_addon.py --fetch-only --platforms linux-x64 --wheels-dir .cache/wheels > /dev/null

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY_DIR = pathlib.Path(os.environ.get("PIXAL3D_PARITY_DIR", REPO.parent / "shared" / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> pathlib.Path:
    if not PARITY_DIR.is_dir():
        pytest.fail(f"parity fixtures not found at {PARITY_DIR}; set PIXAL3D_PARITY_DIR")
    return PARITY_DIR

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

# Triton kernels (kernels/) run through Triton's interpreter where there is no GPU; the flag is read when a kernel
# is defined, so it must be set before any test imports them.
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
